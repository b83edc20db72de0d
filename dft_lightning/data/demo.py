"""``DemoMathDataModule``: the embedded demo's data, generated here (no download).

Writes into ``data_dir``, from ``dft_lightning.data.synthetic``: ``train.jsonl`` (two-step word
problems), ``heldout.jsonl`` (unseen problems of the same templates, when ``num_heldout`` > 0),
``dev.jsonl`` (more unseen problems of those templates, for choosing settings, when ``num_dev`` > 0;
never trained or reported on) and ``test.jsonl`` (harder: three steps, larger numbers). No problem text
is in two of them. It trains on them like any chat data: ``problem`` is the prompt, ``solution``
(ending in ``\\boxed{answer}``) the response. The validation set is ``heldout.jsonl`` when there is one,
else ``test.jsonl``; ``test.jsonl`` is the ``test`` data (``data:test`` for the evaluation callback).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from dft_lightning.data.chat import FieldMap
from dft_lightning.data.module import ChatDataModule
from dft_lightning.data.synthetic import generate, write_jsonl

BOXED_INSTRUCTION = "{prompt}\nPlease reason step by step, and put your final answer within \\boxed{{}}."


class DemoMathDataModule(ChatDataModule):
    """Generated arithmetic word problems (see ``dft_lightning.data.synthetic``).

    Args:
        num_train: training problems to generate.
        num_test: harder problems to generate (three steps; the test set, and the validation set when
            there is no ``heldout`` split).
        num_heldout: unseen problems of the training templates (the validation set when > 0).
        num_dev: unseen problems of the training templates for choosing settings (``dev.jsonl``).
        system_prompt: system message of every chat (the demo's evaluation prompt has one too).
        data_dir: where the generated files go (default: the cache).
        generation_seed: seed of the generator.
        Other arguments: as ``ChatDataModule``.
    """

    def __init__(
        self, num_train: int = 512, num_test: int = 64, num_heldout: int = 0, num_dev: int = 0,
        data_dir: str | None = None, generation_seed: int = 0, system_prompt: str | None = None,
        tokenizer: str | None = None, prompt_template: str = BOXED_INSTRUCTION, max_length: int = 512,
        overlong: Literal["drop", "truncate"] = "drop", batch_size: int = 16, micro_batch_size: int = 4,
        seed: int = 42, num_workers: int = 0, packing: bool = False, pack_length: int | None = None,
        cache: bool = True, chat_template: str | None = None,
    ) -> None:
        from dft_lightning.paths import cache_root

        sizes = f"{num_train}-{num_test}" + (f"-{num_heldout}-{num_dev}" if num_heldout or num_dev else "")
        root = Path(data_dir) if data_dir else cache_root() / "demo_math" / f"{generation_seed}-{sizes}"
        val = root / ("heldout.jsonl" if num_heldout else "test.jsonl")
        super().__init__(
            train=str(root / "train.jsonl"), val=str(val), test=str(root / "test.jsonl"), tokenizer=tokenizer,
            system_prompt=system_prompt,
            fields=FieldMap(prompt="problem", response="solution"), prompt_template=prompt_template,
            max_length=max_length, overlong=overlong, batch_size=batch_size, micro_batch_size=micro_batch_size,
            seed=seed, num_workers=num_workers, packing=packing, pack_length=pack_length, cache=cache,
            chat_template=chat_template,
        )
        self.root, self.num_train, self.num_test, self.generation_seed = root, num_train, num_test, generation_seed
        self.num_heldout, self.num_dev = num_heldout, num_dev

    def prepare_data(self) -> None:
        seed, root = self.generation_seed, self.root
        train = generate("train", self.num_train, seed)
        if not (root / "train.jsonl").exists():
            write_jsonl(train, root / "train.jsonl")
        seen = {row["problem"] for row in train}
        # dev first, then heldout excluding both: the same files whichever of them were written already
        for split, n in (("dev", self.num_dev), ("heldout", self.num_heldout)):
            rows = generate(split, n, seed, exclude=seen) if n else []
            seen |= {row["problem"] for row in rows}
            if n and not (root / f"{split}.jsonl").exists():
                write_jsonl(rows, root / f"{split}.jsonl")
        if not (root / "test.jsonl").exists():
            write_jsonl(generate("test", self.num_test, seed), root / "test.jsonl")

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; also covers ranks on other nodes
        super().setup(stage)
