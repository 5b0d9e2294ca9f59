"""The method-table sweeps: every method of the field against EIR and the bounds, seeds 0-2, checked whole,
and the paper-setting one dry-run on the shared VOC samples (nothing trained, no Ray)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import launch
from eir.methods import METHOD_NAMES, METHODS
from eir.train.sweep import load_sweep, read_sweep

REPO = Path(__file__).resolve().parents[2]
SWEEPS = REPO / "experiments" / "sweeps"
SHARED_VOC = REPO / ".." / "shared" / "data" / "voc2012_samples"
VOC_IDS = ["2011_000003", "2011_000006", "2011_000025"]
# EIR's own ablations answer what its parts add, not where it stands against the field: not in a method table.
ABLATIONS = {"instance_replay", "eir_no_rskd"}
# The methods that share one step 0 (their loss families: BCE on all channels, softmax CE, DKD's BCE).
FAMILIES = ({"finetune", "image_replay", "eir"}, {"mib", "plop"}, {"dkd", "dkd_m"})


@pytest.mark.parametrize(
    ("file", "dataset", "task", "backbone"),
    [
        ("camvid_5-3_methods.yaml", "camvid", "5-3", "mobilenet_v2"),
        ("voc_15-1_methods.yaml", "voc", "15-1", "resnet101"),
    ],
)
def test_a_method_sweep_runs_every_method_with_three_seeds_to_the_last_step(
    file: str, dataset: str, task: str, backbone: str
) -> None:
    spec = read_sweep(SWEEPS / file)
    assert set(spec.space) == {"method.name", "seed"}
    assert set(spec.space["method.name"]["grid"]) == set(METHOD_NAMES) - ABLATIONS, "a method missing from the table"
    assert spec.space["seed"]["grid"] == [0, 1, 2] and spec.num_samples == 1
    assert spec.scheduler == "fifo", "ASHA would stop the weak baselines early and leave their cells empty"
    config = spec.config({"method.name": "eir", "seed": 0})
    assert (config.dataset.name, config.task.name, config.model.backbone) == (dataset, task, backbone)
    assert config.run.step0_cache, "step 0 once per loss family and seed"


@pytest.mark.parametrize("file", ["camvid_5-3_methods.yaml", "voc_15-1_methods.yaml"])
def test_every_trial_runs_its_methods_published_presets(file: str) -> None:
    """A key the experiment file pins beats a method's preset (`load_config`), so a base file that sets one
    (voc_base.yaml's `model.new_head_init: random` did) silently changes a baseline in the table."""
    spec = read_sweep(SWEEPS / file)
    for method in spec.space["method.name"]["grid"]:
        flat = spec.config({"method.name": method, "seed": 0}).flat()
        changed = {key: flat[key] for key, value in METHODS[method].presets.items() if flat[key] != value}
        assert not changed, f"{file}: {method} runs {changed} instead of its presets"


def test_the_camvid_method_sweep_is_checked_whole_on_the_shared_camvid() -> None:
    spec = load_sweep(SWEEPS / "camvid_5-3_methods.yaml")  # every trial's config built and checked
    config = spec.config({"method.name": "mib", "seed": 2})
    assert config.dataset.root == "../shared/data/camvid/CamVid", "the dataset by path, as the other CamVid configs"
    assert config.dataset.test_split == "val"


def voc_samples(tmp_path: Path) -> Path:
    """The 3 shared VOC samples as a VOC root with the split lists they lack, plus one copy of 2011_000003 per
    class none of them holds (its person relabelled 16, 17, 19, 20), so every step of 15-1 has an image: the
    samples hold bottle, bus, car, chair, person and sofa only, and a task step without images is refused."""
    if not SHARED_VOC.is_dir():
        pytest.skip(f"shared VOC samples {SHARED_VOC} are absent")
    root = tmp_path / "VOC2012"
    for folder in ("JPEGImages", "SegmentationClassAug", "SegmentationClass", "ImageSets/Segmentation"):
        (root / folder).mkdir(parents=True)
    for sample in VOC_IDS:
        for folder, suffix in (("JPEGImages", "jpg"), ("SegmentationClassAug", "png"), ("SegmentationClass", "png")):
            (root / folder / f"{sample}.{suffix}").symlink_to((SHARED_VOC / folder / f"{sample}.{suffix}").resolve())
    person = Image.open(SHARED_VOC / "SegmentationClassAug" / "2011_000003.png")
    extra = []
    for cls in (16, 17, 19, 20):
        sample = f"2011_000003_as{cls}"
        label = np.array(person)
        label[label == 15] = cls
        relabelled = Image.fromarray(label, mode="P")
        relabelled.putpalette(person.getpalette())
        relabelled.save(root / "SegmentationClassAug" / f"{sample}.png")
        (root / "JPEGImages" / f"{sample}.jpg").symlink_to((SHARED_VOC / "JPEGImages" / "2011_000003.jpg").resolve())
        extra.append(sample)
    (root / "ImageSets" / "Segmentation" / "train_aug.txt").write_text("\n".join(VOC_IDS + extra) + "\n")
    (root / "ImageSets" / "Segmentation" / "val.txt").write_text("\n".join(VOC_IDS) + "\n")
    return root


@pytest.mark.filterwarnings("ignore:task voc")  # a handful of images per step: the thin-step warning, expected
def test_the_voc_method_sweep_dry_run_on_the_shared_samples(tmp_path: Path, capsys) -> None:
    out = tmp_path / "outputs"
    code = launch.main(
        [
            "sweep",
            str(SWEEPS / "voc_15-1_methods.yaml"),
            "--dry-run",
            f"dataset.root={voc_samples(tmp_path)}",
            f"run.output_dir={out}",
        ]
    )
    printed = capsys.readouterr().out
    assert code == 0
    methods = [m for m in sorted(METHOD_NAMES) if m not in ABLATIONS]
    lines = {line.split()[0]: line for line in printed.splitlines() if line.startswith("  method.name=")}
    assert set(lines) == {f"method.name={m},seed={s}" for m in methods for s in (0, 1, 2)}
    # Step 0 once per loss family and seed: three families (joint has no step 0), 9 step 0s for 24 trials.
    assert "step 0 trained 9× for 24 trials" in printed
    assert all(lines[f"method.name=joint,seed={s}"].endswith("step 0 none (one joint step)") for s in (0, 1, 2))
    for seed in (0, 1, 2):
        trainers = {m for m in methods if lines[f"method.name={m},seed={seed}"].endswith("step 0 trains")}
        assert len(trainers) == 3 and all(len(trainers & family) == 1 for family in FAMILIES), trainers
    table = printed[printed.index("step  train imgs") :].splitlines()[1:7]
    assert [row.split()[:2] for row in table] == [["0", "7"]] + [[str(step), "1"] for step in range(1, 6)]
    assert not (out / "sweeps").exists() and not (out / "cache").exists(), "a dry run trains and records nothing"
