"""The Hugging Face convention: with labels in training, ``out.loss`` includes the PE's auxiliary loss, so
``transformers.Trainer`` (and any loop optimizing ``loss``) trains SeqPE with its regularizers."""

from pathlib import Path

import pytest
import torch
from transformers import Trainer, TrainingArguments

from seqpe_nd.encodings import build_position_encoding
from seqpe_nd.tasks.attach import PELogCallback, attach_position_encoding, pe_sizes
from tests.tasks.test_user_defaults import MODELS, SPACE, VOCAB

SEQPE = {"method": "seqpe", "layers": 1, "dropout": 0.0}


def seqpe_model(arch: str, alpha: float = 0.1, beta: float = 0.1):
    torch.manual_seed(0)
    model = MODELS[arch]()
    pe = build_position_encoding({**SEQPE, "alpha": alpha, "beta": beta}, space=SPACE, **pe_sizes(model))
    return attach_position_encoding(model, pe)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_loss_with_labels_is_the_loss_to_optimize_in_training_only(arch: str) -> None:
    model = seqpe_model(arch).train()
    ids = torch.randint(0, VOCAB, (2, 12))
    out = model(ids, labels=ids)
    assert out.pe_aux_loss is not None and float(out.pe_aux_loss.detach()) > 0
    torch.testing.assert_close(out.loss, out.lm_loss + out.pe_aux_loss)
    assert {"loss_delta", "loss_ood"} <= set(out.pe_logs)
    assert model(ids).loss is None  # no labels, no loss
    model.eval()
    with torch.no_grad():
        out = model(ids, labels=ids)
    assert out.pe_aux_loss is None and torch.equal(out.loss, out.lm_loss)  # evaluation: the task loss, no regularizer work


class Sequences(torch.utils.data.Dataset):
    """A handful of local token sequences (no download)."""

    def __init__(self, n: int = 16, length: int = 12) -> None:
        g = torch.Generator().manual_seed(1)
        self.ids = torch.randint(0, VOCAB, (n, length), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def train_with_trainer(model, out: Path, steps: int) -> Trainer:
    args = TrainingArguments(output_dir=str(out), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
                             logging_steps=2, save_strategy="no", report_to=[], use_cpu=True, disable_tqdm=True,
                             seed=0, data_seed=0, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=Sequences(), callbacks=[PELogCallback()])
    trainer.train()
    return trainer


def test_trainer_trains_seqpe_with_its_regularizers_and_logs_their_parts(tmp_path: Path) -> None:
    model = seqpe_model("llama")
    trainer = train_with_trainer(model, tmp_path / "reg", steps=4)
    logs = [h for h in trainer.state.log_history if "loss" in h]
    assert len(logs) == 2 and all({"pe/loss_delta", "pe/loss_ood", "pe/loss_reg"} <= set(h) for h in logs)
    assert all(h["pe/loss_delta"] > 0 for h in logs)
    # The regularizers' gradient reaches the encoder: the same run without them (alpha = beta = 0, no dropout
    # anywhere, the same data order) ends with other encoder weights.
    plain = seqpe_model("llama", alpha=0.0, beta=0.0)
    torch.testing.assert_close(plain.pe.encoder.state_dict(), seqpe_model("llama").pe.encoder.state_dict())  # same init
    train_with_trainer(plain, tmp_path / "plain", steps=4)
    moved = max((a - b).abs().max().item() for a, b in zip(model.pe.encoder.parameters(), plain.pe.encoder.parameters()))
    assert moved > 1e-6
