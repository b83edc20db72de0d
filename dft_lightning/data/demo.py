"""``DemoMathDataModule``: the embedded demo's data, generated here (no download).

Writes ``train.jsonl`` (two-step word problems) and ``test.jsonl`` (held-out, harder: three steps,
larger numbers) from ``dft_lightning.data.synthetic`` into ``data_dir`` and trains on them like any
chat data: ``problem`` is the prompt, ``solution`` (ending in ``\\boxed{answer}``) the response. The
held-out split is the validation set.
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
        num_test: held-out problems to generate (the validation set).
        data_dir: where the generated files go (default: the cache).
        generation_seed: seed of the generator.
        Other arguments: as ``ChatDataModule``.
    """

    def __init__(
        self, num_train: int = 512, num_test: int = 64, data_dir: str | None = None, generation_seed: int = 0,
        tokenizer: str | None = None, prompt_template: str = BOXED_INSTRUCTION, max_length: int = 512,
        overlong: Literal["drop", "truncate"] = "drop", batch_size: int = 16, micro_batch_size: int = 4,
        seed: int = 42, num_workers: int = 0, packing: bool = False, pack_length: int | None = None,
        cache: bool = True, chat_template: str | None = None,
    ) -> None:
        from dft_lightning.paths import cache_root

        root = Path(data_dir) if data_dir else cache_root() / "demo_math" / f"{generation_seed}-{num_train}-{num_test}"
        super().__init__(
            train=str(root / "train.jsonl"), val=str(root / "test.jsonl"), tokenizer=tokenizer,
            fields=FieldMap(prompt="problem", response="solution"), prompt_template=prompt_template,
            max_length=max_length, overlong=overlong, batch_size=batch_size, micro_batch_size=micro_batch_size,
            seed=seed, num_workers=num_workers, packing=packing, pack_length=pack_length, cache=cache,
            chat_template=chat_template,
        )
        self.root, self.num_train, self.num_test, self.generation_seed = root, num_train, num_test, generation_seed

    def prepare_data(self) -> None:
        if not (self.root / "train.jsonl").exists():
            write_jsonl(generate("train", self.num_train, self.generation_seed), self.root / "train.jsonl")
        if not (self.root / "test.jsonl").exists():
            write_jsonl(generate("test", self.num_test, self.generation_seed), self.root / "test.jsonl")

    def setup(self, stage: str | None = None) -> None:
        self.prepare_data()  # idempotent; also covers ranks on other nodes
        super().setup(stage)
