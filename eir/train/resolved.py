"""An experiment as resolved before its first step: prepared data, task, splits, layout, run folder.

`resolve` does the I/O (it prepares a split not yet in the dataset cache and reads or writes the
step splits); everything after it that decides what a step does is the pure planner's
(`eir.train.planner`), fed from `Experiment.facts`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from eir import storage
from eir.channels import ChannelSpace
from eir.config import ExperimentConfig
from eir.data.ingest import Manifest
from eir.data.prepare import ensure_prepared
from eir.data.splits import StepSplits, step_splits
from eir.metrics import StepScores
from eir.storage import Location
from eir.tasks import Task
from eir.train.planner import FaultInjection, PreviousStep, RunFacts, RunLayout, StepDesign, plan_step
from eir.train.results import step_row


@dataclass
class Experiment:
    """Everything resolved before training: data, task, splits, layout (schedule and channel space)."""

    config: ExperimentConfig
    output_root: Location
    run_dir: Location
    train_manifest: Manifest
    test_manifest: Manifest
    layout: RunLayout
    train_splits: StepSplits
    test_splits: StepSplits
    progress: bool = True  # progress bars (off in sweeps and tests)

    @property
    def task(self) -> Task:
        """The task as evaluated."""
        return self.layout.task

    @property
    def schedule(self) -> Task:
        """The task as trained (task.joint() for the joint baseline)."""
        return self.layout.schedule

    @property
    def channels(self) -> ChannelSpace:
        return self.layout.channels

    @property
    def is_joint(self) -> bool:
        return self.layout.joint

    def eval_step(self, step: int) -> int:
        return self.layout.eval_step(step)

    def groups(self, step: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.layout.groups(step)

    @property
    def facts(self) -> RunFacts:
        return RunFacts(self.layout, tuple(self.train_splits.counts), tuple(self.test_splits.counts), self.progress)

    def design(
        self, step: int, previous: PreviousStep | None = None, fault: FaultInjection | None = None
    ) -> StepDesign:
        """Step `step`'s plan and stream spec (`eir.train.planner.plan_step`)."""
        return plan_step(self.config, self.facts, step, previous, fault)

    def step_dir(self, step: int) -> Location:
        return self.run_dir.join(f"step_{step}")

    @property
    def checksums(self) -> dict[str, str]:
        return {"train_split_checksum": self.train_splits.checksum, "test_split_checksum": self.test_splits.checksum}

    def row(self, step: int, scores: StepScores, source: str) -> dict[str, Any]:
        """Step `step`'s results.json entry."""
        return step_row(
            step,
            scores,
            class_names=self.train_manifest.info.class_names,
            channels=self.channels,
            seen_classes=self.task.classes_seen(self.eval_step(step)),
            train_images=self.train_splits.counts[step],
            source=source,
        )


def resolve(config: ExperimentConfig, *, progress: bool = True, run_dir: Location | None = None) -> Experiment:
    """Prepare (or find) the train and test splits, build the task and choose every step's images."""
    root = storage.resolve(config.run.output_dir)
    data = config.dataset
    prepared = {
        split: ensure_prepared(
            data.name,
            data.root,
            split,
            root,
            image_scale=data.image_scale,
            ade_ignore_other=data.ade_ignore_other,
            synthetic=(data.synthetic_num_images, data.synthetic_image_size, data.synthetic_seed),
            progress=progress,
        )
        for split in (data.train_split, data.test_split)
    }
    train_manifest, test_manifest = prepared[data.train_split], prepared[data.test_split]
    info = train_manifest.info
    layout = RunLayout.for_dataset(config, data.name, info.num_classes, info.future_label)
    return Experiment(
        config=config,
        output_root=root,
        run_dir=run_dir or root.join(config.run.name),
        train_manifest=train_manifest,
        test_manifest=test_manifest,
        layout=layout,
        train_splits=step_splits(layout.schedule, train_manifest, root, purpose="train"),
        test_splits=step_splits(layout.task, test_manifest, root, purpose="test"),
        progress=progress,
    )


def pseudo_label_dir(exp: Experiment, step: int) -> Location:
    """Where step `step` stores its pseudo-labelled rows (complete once its marker is written)."""
    return exp.step_dir(step).join("pseudo")


def replayed_pseudo_label_dir(exp: Experiment, step: int) -> Location:
    """Where step `step` stores its pseudo-labelled replayed images (`replay.pseudo_label`)."""
    return exp.step_dir(step).join("pseudo_replayed")
