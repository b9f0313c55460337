"""The models shipped in model_store/ do what their cards say, on data they never saw.

Every figure is measured here on a freshly generated held-out set whose seed no
training run used (training drew seed 0 and validated on seed 1), loading the models
exactly as the server does: through ``ModelStore`` and the server's preprocessing.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from dgserve.data import CLASSES, export_coco
from dgserve.data.scenes import render_classification
from dgserve.connectivity import ImageConnectivity
from dgserve.models.connectivity import collect_connectivity
from dgserve.imaging import preprocess
from dgserve.settings import Settings
from dgserve.tasks import get_task
from dgserve.tasks.detection import Detection
from dgserve.model_store import LoadedModel, ModelStore

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "model_store"
CLASSIFIERS = ["shapes-dgnet", "shapes-glore"]
DETECTOR = "shapes-detector"
HELD_OUT_SEED = 20251  # not a training or validation seed of any bundled model
CLASSIFICATION_IMAGES = 600
DETECTION_SCENES = 150
BATCH = 50
PHOTOS = 200


@pytest.fixture(autouse=True)
def _threads() -> None:
    torch.set_num_threads(1)  # the CI machine is small; a busy second thread only spin-waits


def _load(name: str) -> LoadedModel:
    return ModelStore(STORE).load(name)


def _edge_pattern(record: ImageConnectivity) -> tuple[float, ...]:
    # Routed edges only: rows 2.. (blocks after the first, then the output), columns 1.. (blocks).
    return tuple(
        w for stage in record["stages"] for r, row in enumerate(stage.adjacency) for c, w in enumerate(row) if r >= 2 and 1 <= c < r
    )


def _check_instance_aware(records: list[ImageConnectivity], groups: list[int]) -> dict[str, float]:
    closed = [1 - sum(s.open_edges for s in r["stages"]) / sum(s.possible_edges for s in r["stages"]) for r in records]
    weights = torch.tensor([_edge_pattern(r) for r in records])
    patterns = {tuple(row) for row in (weights > 0).tolist()}
    class_means = torch.stack([weights[torch.tensor(groups) == g].mean(0) for g in sorted(set(groups))])
    spread = float((class_means[:, None] - class_means[None]).abs().max())
    figures = {"closed": sum(closed) / len(closed), "patterns": len(patterns), "class_spread": spread}
    assert figures["closed"] >= 0.10, figures
    assert figures["patterns"] >= 5, figures
    assert figures["class_spread"] > 1e-3, figures  # per-class mean adjacencies are not all the same
    return figures


def test_store_holds_every_bundled_model_with_a_card_within_60_mb() -> None:
    store = ModelStore(STORE)
    assert set(store.names()) >= {*CLASSIFIERS, DETECTOR, "shapes-segmenter", "shapes-video"}
    total = sum(p.stat().st_size for p in STORE.rglob("*") if p.is_file())
    assert total < 60 * 2**20
    for name in store.names():
        stored = store.resolve(name)
        assert stored.card_path is not None, f"{name} has no card.md"


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_top1_on_held_out_images(name: str) -> None:
    loaded = _load(name)
    assert loaded.manifest.labels == list(CLASSES)
    correct, records, labels = 0, [], []
    for start in range(0, CLASSIFICATION_IMAGES, BATCH):
        rendered = [render_classification(HELD_OUT_SEED, i, 64) for i in range(start, start + BATCH)]
        x = torch.stack([preprocess(img, loaded.manifest.preprocessing) for img, _ in rendered])
        y = torch.tensor([label for _, label in rendered])
        with torch.no_grad():
            correct += int((loaded.model(x).argmax(1) == y).sum())
        if loaded.manifest.architecture.startswith("dgnet"):
            records += collect_connectivity(loaded.model, len(y))
        labels += y.tolist()
    top1 = correct / CLASSIFICATION_IMAGES
    assert top1 >= 0.95, f"{name}: held-out top-1 {top1:.4f}"
    if records:
        _check_instance_aware(records, labels)


@pytest.mark.parametrize("name", CLASSIFIERS)
def test_classifier_answers_photos_decoded_at_a_reduced_scale_as_at_full_size(name: str) -> None:
    """DGSERVE_JPEG_DRAFT's accuracy: camera-sized JPEGs through the server's own upload path, both ways."""
    loaded = _load(name)
    task, pre = get_task("classification"), loaded.manifest.preprocessing
    top1 = {}
    for draft in (False, True):
        settings = Settings(jpeg_draft=draft)
        inputs, labels = [], []
        for i in range(PHOTOS):
            scene, label = render_classification(HELD_OUT_SEED, i, 256)
            buf = io.BytesIO()
            scene.resize((640, 480) if i % 2 else (480, 640), Image.Resampling.BICUBIC).save(buf, "JPEG", quality=85)
            inputs.append(task.prepare_upload(buf.getvalue(), None, pre, settings)[0])
            labels.append(label)
        with torch.no_grad():
            top1[draft] = loaded.model(torch.stack(inputs)).argmax(1)
    agree = int((top1[True] == top1[False]).sum())
    assert agree >= 0.95 * PHOTOS, f"{name}: {agree}/{PHOTOS} photos get the same label both ways"
    truth = torch.tensor(labels)
    correct = {draft: int((top1[draft] == truth).sum()) for draft in (False, True)}
    assert correct[True] >= correct[False] - 0.02 * PHOTOS, f"{name}: correct {correct}"


def _coco_quietly(annotation_file: Path) -> COCO:
    with contextlib.redirect_stdout(io.StringIO()):
        return COCO(str(annotation_file))


def test_detector_map50_by_cocoeval_and_instance_aware_routing(tmp_path: Path) -> None:
    loaded = _load(DETECTOR)
    annotation_file = export_coco(tmp_path, DETECTION_SCENES, HELD_OUT_SEED, size=128, max_objects=5)
    truth = _coco_quietly(annotation_file)
    image_ids = sorted(truth.getImgIds())
    detections, records, groups = [], [], []
    for start in range(0, len(image_ids), BATCH // 5):
        ids = image_ids[start : start + BATCH // 5]
        tensors = []
        for image_id in ids:
            with Image.open(tmp_path / "images" / truth.imgs[image_id]["file_name"]) as img:
                tensor, scale = Detection().prepare(img.convert("RGB"), loaded.manifest.preprocessing)
            assert scale == 1.0
            tensors.append(tensor)
        with torch.no_grad():
            outputs = loaded.model(tensors)
        records += collect_connectivity(loaded.model, len(ids))
        for image_id, output in zip(ids, outputs, strict=True):
            anns = truth.imgToAnns[image_id]
            groups.append(max(anns, key=lambda a: a["area"])["category_id"])  # the scene's largest object
            for box, label, score in zip(output["boxes"].tolist(), output["labels"].tolist(), output["scores"].tolist(), strict=True):
                x0, y0, x1, y1 = box
                detections.append({"image_id": image_id, "category_id": label, "bbox": [x0, y0, x1 - x0, y1 - y0], "score": score})
    assert detections, "the detector found nothing"
    result_file = tmp_path / "detections.json"
    result_file.write_text(json.dumps(detections))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval = COCOeval(truth, truth.loadRes(str(result_file)), iouType="bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    map50 = float(coco_eval.stats[1])
    assert map50 >= 0.6, f"held-out mAP@0.5 {map50:.4f}"
    _check_instance_aware(records, groups)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "PNG")
    return buf.getvalue()


def _iou(a: list[float], b: list[float]) -> float:
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return w * h / union


def test_served_end_to_end(tmp_path: Path) -> None:
    """Through the real app: class k comes back as k, boxes land on the shapes, and each
    response's connectivity is what the inspection record stores."""
    import asyncio

    import httpx

    from dgserve.api.app import create_app
    from dgserve.data.scenes import render_detection_scene
    from dgserve.settings import Settings

    async def scenario() -> None:
        app = create_app(Settings(model_store=STORE, data_dir=tmp_path, torch_threads=1, grpc_port=None))
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
                for name in CLASSIFIERS:
                    for index in range(len(CLASSES)):  # labels cycle, so these are one image per class
                        image, label = render_classification(HELD_OUT_SEED + 1, index, 64)
                        response = await client.post(f"/v1/models/{name}/classify", content=_png(image),
                                                     headers={"content-type": "image/png"})  # fmt: skip
                        assert response.status_code == 200, response.text
                        result = response.json()["results"][0]
                        assert result["predictions"][0]["label"] == CLASSES[label], (name, index)
                        record = (await client.get(f"/v1/inspections/{result['id']}")).json()
                        assert record["connectivity"] == result["connectivity"]
                scene = render_detection_scene(HELD_OUT_SEED + 1, 0, 128, 5)
                response = await client.post(f"/v1/models/{DETECTOR}/detect", content=_png(scene.image),
                                             headers={"content-type": "image/png"})  # fmt: skip
                assert response.status_code == 200, response.text
                result = response.json()["results"][0]
                for box, label in zip(scene.boxes.tolist(), scene.labels.tolist(), strict=True):
                    assert any(
                        d["label"] == CLASSES[label] and _iou(d["box"], box) >= 0.5 for d in result["predictions"]
                    ), (box, CLASSES[label], result["predictions"])
                record = (await client.get(f"/v1/inspections/{result['id']}")).json()
                assert record["connectivity"] == result["connectivity"] and result["connectivity"]["stages"]

    asyncio.run(scenario())


VIDEO = "shapes-video"
VIDEO_CLIPS = 210  # 30 videos of each of the 7 motions


def test_video_classifier_top1_on_held_out_clips() -> None:
    """shapes-video on generated videos of a seed no training drew, cut into clips as the server cuts uploads."""
    from torch.utils.data import DataLoader

    from dgserve.data.clips import MOTIONS, MotionClips
    from dgserve.tasks import get_task
    from dgserve.tasks.video import GENERATED_LENGTH

    loaded = _load(VIDEO)
    assert loaded.manifest.labels == list(MOTIONS)
    task = get_task(loaded.manifest.task)
    held_out = MotionClips(VIDEO_CLIPS, HELD_OUT_SEED, loaded.manifest.preprocessing, GENERATED_LENGTH)
    with torch.no_grad():
        figures = task.evaluate(loaded.model, DataLoader(held_out, batch_size=BATCH), len(MOTIONS), progress=False)
    assert figures["images"] == VIDEO_CLIPS
    assert figures["top1"] >= 0.90, figures


SEGMENTER = "shapes-segmenter"
SEGMENTATION_SCENES = 150


def test_segmenter_miou_on_held_out_scenes() -> None:
    """shapes-segmenter's mIoU on scenes of a seed no training drew, preprocessed as the server does."""
    from torch.utils.data import DataLoader

    from dgserve.data import ShapesSegmentation
    from dgserve.tasks import get_task

    loaded = _load(SEGMENTER)
    assert loaded.manifest.labels == ["background", *CLASSES]
    task = get_task(loaded.manifest.task)
    pre = loaded.manifest.preprocessing
    held_out = ShapesSegmentation(SEGMENTATION_SCENES, HELD_OUT_SEED, pre.input_size[0],
                                  transform=lambda image: task.prepare(image, pre)[0])  # fmt: skip
    figures = task.evaluate(loaded.model, DataLoader(held_out, batch_size=BATCH), len(CLASSES) + 1, progress=False)
    assert figures["mIoU"] >= 0.80, figures
    assert min(figures["per_class_iou"]) >= 0.5, figures  # no class is left behind by the mean


def test_segment_end_to_end_against_the_true_mask(tmp_path: Path) -> None:
    """One scene through the real app, uploaded at twice its size: the label map comes back at the
    upload's size and matches the true mask, and the GloRe unit's projection map is recorded."""
    import asyncio

    import httpx
    import numpy as np

    from dgserve.api.app import create_app
    from dgserve.data.scenes import render_segmentation
    from dgserve.settings import Settings
    from dgserve.tasks.segmentation import decode_label_map

    image, truth = render_segmentation(HELD_OUT_SEED + 1, 0, 96)
    upload = image.resize((192, 192), Image.Resampling.NEAREST)
    truth = np.kron(truth, np.ones((2, 2), np.uint8))  # the true mask at the upload's size

    async def scenario() -> dict[str, object]:
        app = create_app(Settings(model_store=STORE, data_dir=tmp_path, models=[SEGMENTER], torch_threads=1,
                                  grpc_port=None))  # fmt: skip
        async with app.router.lifespan_context(app):
            transport = httpx.ASGITransport(app=app)
            async with httpx.AsyncClient(transport=transport, base_url="http://test", timeout=120) as client:
                while (await client.get("/readyz")).status_code != 200:
                    await asyncio.sleep(0.05)
                response = await client.post(f"/v1/models/{SEGMENTER}/segment", content=_png(upload),
                                             headers={"content-type": "image/png"})  # fmt: skip
                assert response.status_code == 200, response.text
                result: dict[str, object] = response.json()["results"][0]
                record = (await client.get(f"/v1/inspections/{result['id']}")).json()
                assert record["prediction"]["predictions"] == result["predictions"]
                return result

    result = asyncio.run(scenario())
    label_map = decode_label_map(result["predictions"])  # type: ignore[arg-type]
    assert label_map.shape == truth.shape == (192, 192)
    assert (label_map == truth).mean() >= 0.95
    for k in np.unique(truth):
        iou = ((label_map == k) & (truth == k)).sum() / ((label_map == k) | (truth == k)).sum()
        assert iou >= 0.7, (CLASSES[k - 1] if k else "background", iou)
    [unit] = result["connectivity"]["glore_units"]  # type: ignore[index]
    assert len(unit["projection"]) == 12  # the unit's feature map: the 96 px model input at output stride 8
