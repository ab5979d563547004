"""Retrieval metrics: chunked ranking against a brute-force N x N argsort, clip_val_loss against
open_clip's ClipLoss, and the results.jsonl / TensorBoard record."""
import json
import math
from argparse import Namespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss

from helpers import CONFIGS, model_args
from nsoclip.loader import DataInfo
from nsoclip.distributed import World
from nsoclip.evaluate import evaluate, write_results
from nsoclip.model import create_model_and_transforms
from nsoclip.retrieval import RetrievalError, features_metrics, retrieval_metrics


def brute_force_metrics(image_features, text_features):
    """OpenCLIP's recipe: the full similarity matrix, argsort, position of the true partner."""
    logits = image_features @ text_features.T
    truth = torch.arange(len(logits))
    metrics = {}
    for direction, scores in (("image_to_text", logits), ("text_to_image", logits.T)):
        order = torch.argsort(scores, dim=1, descending=True)
        positions = torch.where(order == truth[:, None])[1].numpy()
        metrics[f"{direction}_mean_rank"] = positions.mean() + 1
        metrics[f"{direction}_median_rank"] = np.floor(np.median(positions)) + 1
        for k in (1, 5, 10):
            metrics[f"{direction}_R@{k}"] = np.mean(positions < k)
    return metrics


def correlated_features(count, dim, seed):
    """Image and text features that are noisy copies of each other: ranks spread over 0..N."""
    generator = torch.Generator().manual_seed(seed)
    shared = torch.randn(count, dim, generator=generator)
    images = F.normalize(shared + 0.8 * torch.randn(count, dim, generator=generator), dim=1)
    texts = F.normalize(shared + 0.8 * torch.randn(count, dim, generator=generator), dim=1)
    return images, texts


@pytest.mark.parametrize("count", [1, 2, 37])
def test_ranks_equal_brute_force_for_any_chunk_size(count):
    images, texts = correlated_features(count, 6, seed=count)
    expected = brute_force_metrics(images, texts)
    if count == 37:
        assert 0 < expected["image_to_text_R@1"] < expected["image_to_text_R@10"] < 1
    for chunk_size in (1, 4, count, 1000):
        assert features_metrics(images, texts, World(), chunk_size) == expected


def test_tied_candidates_give_the_optimistic_rank():
    images = F.normalize(torch.tensor([[1.0, 0.0], [1.0, 0.2], [0.0, 1.0]]), dim=1)
    texts = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])   # texts 0 and 1 are identical
    metrics = features_metrics(images, texts, World(), chunk_size=2)
    assert metrics["image_to_text_R@1"] == 1.0       # image 1's partner ties for first place
    assert metrics["text_to_image_R@1"] == pytest.approx(2 / 3)   # text 1 prefers image 0


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    model, _, _, tokenizer = create_model_and_transforms(
        model_args(str(CONFIGS / "tiny-vit.json")), torch.device("cpu"))
    return model, tokenizer


def eval_args():
    return Namespace(imagenet_val=None, imagenet_v2=None, imagenet_a=None, imagenet_r=None, zeroshot_data=None,
                     zeroshot_classnames=None, zeroshot_templates=None, val_data="val.csv",
                     batch_size=4, workers=0, precision="fp32")


def test_model_metrics_equal_brute_force_and_open_clip_loss(tiny):
    model, tokenizer = tiny
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(11, 3, 32, 32, generator=generator)
    texts = tokenizer([f"caption {i} about {'cats' if i % 2 else 'dogs'}" for i in range(11)])
    batches = [(images[i:i + 4], texts[i:i + 4]) for i in range(0, 11, 4)]   # 4, 4, 3
    model.train()
    metrics = evaluate(model, eval_args(), World(), tokenizer, None, val_data=DataInfo(batches, 3, 11))
    assert model.training, "evaluate must give the model back in train mode"

    model.eval()
    with torch.no_grad():
        outputs = [model(image=i, text=t) for i, t in batches]
        clip_loss = ClipLoss()
        expected_loss = sum(float(clip_loss(o["image_features"], o["text_features"], o["logit_scale"])) * len(i)
                            for o, (i, _) in zip(outputs, batches)) / 11
        all_images = torch.cat([o["image_features"] for o in outputs])
        all_texts = torch.cat([o["text_features"] for o in outputs])
    expected = brute_force_metrics(all_images, all_texts)
    loss = metrics.pop("clip_val_loss")
    assert loss == pytest.approx(expected_loss, rel=1e-6) and math.isfinite(loss)
    assert metrics.pop("num_samples") == 11
    assert metrics == expected


def test_no_validation_samples_is_an_error(tiny):
    model, tokenizer = tiny
    with pytest.raises(RetrievalError, match="--val-data val.csv: no validation samples"):
        retrieval_metrics(model.eval(), DataInfo([], 0, 0), eval_args(), World())


class RecordingWriter:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, value, step))


def test_write_results_appends_json_lines_and_tensorboard_scalars(tmp_path):
    writer = RecordingWriter()
    write_results({"clip_val_loss": 1.5, "image_to_text_R@1": 0.25}, tmp_path, epoch=1, step=10, tb_writer=writer)
    write_results({"imagenet-zeroshot-val-top1": 0.5}, tmp_path, epoch=2, step=20)
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert lines == [{"epoch": 1, "step": 10, "clip_val_loss": 1.5, "image_to_text_R@1": 0.25},
                     {"epoch": 2, "step": 20, "imagenet-zeroshot-val-top1": 0.5}]
    assert writer.scalars == [("val/clip_val_loss", 1.5, 10), ("val/image_to_text_R@1", 0.25, 10)]
