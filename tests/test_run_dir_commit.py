"""RunDir after its check, in-process on real files (reweight.cli.run_dir): the commit and what
it removes or moves, the held log lines, the lock, a diverged run, the writability checks and
the Hydra callback that removes the folders of a failed job. test_run_dir.py drives the same
paths through the CLI in a subprocess, which a mutation run (tools/mutation.py) cannot see."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from reweight.cli.hydra_dirs import RunDirCleanup
from reweight.cli.run_dir import RunDir, RunDirError, hydra_files

OLD = {"a": 1, "trainer": {"max_steps": 4}}


def old_run(folder: Path, finished: bool, step: int = 2) -> None:
    """A run's files as a previous invocation left them, and two files that are not a run's."""
    (folder / ".hydra").mkdir(parents=True)
    (folder / "config.yaml").write_text(yaml.safe_dump(OLD))
    torch.save({"step": step}, folder / "checkpoint.pt")
    for name in ("metrics.csv", "weights.pt", "labels.pt", "dataset.json", "mlflow_run_id.txt"):
        (folder / name).write_text("old " + name)
    for name in ("config.yaml", "hydra.yaml", "overrides.yaml"):
        (folder / ".hydra" / name).write_text("old")
    (folder / "tensorboard" / "sub").mkdir(parents=True)
    (folder / "tensorboard" / "sub" / "events").write_text("old")
    (folder / "mine.txt").write_text("not a run file")
    (folder / "notes").mkdir()
    if finished:
        (folder / "summary.json").write_text(json.dumps({"test_accuracy": 0.5}))


def names(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# -- the commit --------------------------------------------------------------------------------


def test_a_fresh_commit_writes_the_files_then_the_writers_once(tmp_path: Path):
    run_dir = tmp_path / "a" / "run"
    seen = []
    with RunDir(run_dir) as run:
        assert run.check(yaml.safe_dump(OLD), resume=True, max_steps=4) is None
        assert not run_dir.exists()  # nothing before the commit
        files = {"config.yaml": b"a: 1\n", ".hydra/overrides.yaml": b"- a=1\n"}
        run.commit(files, lambda p: seen.append(("w1", p)), lambda p: seen.append(("w2", p)))
        run.commit({"config.yaml": b"a: 2\n"}, lambda p: seen.append(("again", p)))
    assert seen == [("w1", run_dir), ("w2", run_dir)]
    assert (run_dir / "config.yaml").read_bytes() == b"a: 1\n"
    assert (run_dir / ".hydra" / "overrides.yaml").read_bytes() == b"- a=1\n"
    assert names(run_dir) == [".hydra", ".hydra/overrides.yaml", "config.yaml"]


def test_a_commit_that_fails_removes_what_it_wrote_and_the_folder_it_made(tmp_path: Path):
    run_dir = tmp_path / "run"

    def fail(path: Path) -> None:
        (path / "half").mkdir()
        (path / "half" / "written").write_text("x")
        raise OSError("disk full")

    with RunDir(run_dir) as run, pytest.raises(OSError, match="disk full"):
        run.check("a: 1\n", resume=True, max_steps=4)
        run.commit({"config.yaml": b"a: 1\n", ".hydra/x.yaml": b"x"}, fail)
    assert not run_dir.exists()


def test_a_commit_that_fails_in_an_existing_folder_keeps_what_was_there(tmp_path: Path):
    (tmp_path / "mine.txt").write_text("mine")
    (tmp_path / "notes").mkdir()

    def fail(path: Path) -> None:
        raise RuntimeError("no")

    with RunDir(tmp_path) as run, pytest.raises(RuntimeError):
        run.check("a: 1\n", resume=True, max_steps=4)
        run.commit({"config.yaml": b"a: 1\n", "sub/x": b"x"}, fail)
    assert names(tmp_path) == ["mine.txt", "notes"]


def test_resume_false_removes_the_unfinished_run_at_the_commit(tmp_path: Path):
    old_run(tmp_path, finished=False)
    (tmp_path / "diverged.json").write_text("{}")
    (tmp_path / "wandb").mkdir()
    (tmp_path / "mlruns" / "0").mkdir(parents=True)
    with RunDir(tmp_path) as run:
        assert run.check("a: 2\n", resume=False, max_steps=4) is None
        assert (tmp_path / "metrics.csv").exists()  # nothing removed before the commit
        run.commit({"config.yaml": b"a: 2\n"})
    assert names(tmp_path) == ["config.yaml", "mine.txt", "notes"]
    assert (tmp_path / "config.yaml").read_text() == "a: 2\n"
    assert not (tmp_path.parent / (tmp_path.name + ".replaced")).exists()


def test_resume_false_keeps_a_hydra_folder_that_holds_other_files(tmp_path: Path):
    old_run(tmp_path, finished=False)
    (tmp_path / ".hydra" / "mine.yaml").write_text("mine")
    with RunDir(tmp_path) as run:
        run.check("a: 2\n", resume=False, max_steps=4)
        run.commit({})
    assert names(tmp_path) == [".hydra", ".hydra/mine.yaml", "mine.txt", "notes"]


def test_resume_keeps_the_run_and_drops_the_divergence_record(tmp_path: Path):
    old_run(tmp_path, finished=False)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    with RunDir(tmp_path) as run:
        assert run.check(yaml.safe_dump(OLD), resume=True, max_steps=4) is None
        run.commit({"extra.txt": b"new"})
    assert {p: p.read_bytes() for p in before} == before  # nothing of the run removed
    assert (tmp_path / "extra.txt").read_bytes() == b"new"


def test_resume_without_a_checkpoint_starts_over(tmp_path: Path):
    old_run(tmp_path, finished=False)
    (tmp_path / "checkpoint.pt").unlink()
    with RunDir(tmp_path) as run:
        assert run.check(yaml.safe_dump(OLD), resume=True, max_steps=4) is None
        run.commit({})
    assert names(tmp_path) == ["mine.txt", "notes"]


def test_resume_false_moves_a_finished_run_beside_until_finish(tmp_path: Path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old_run(run_dir, finished=True)
    kept = tmp_path / "run.replaced"
    kept.mkdir()  # a run kept there earlier: superseded
    (kept / "stale.txt").write_text("stale")
    before = {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in run_dir.rglob("*")
        if p.is_file() and p.name != "mine.txt"
    }
    with RunDir(run_dir) as run:
        assert run.replaced == kept
        assert run.check("a: 2\n", resume=False, max_steps=4) is None
        run.commit({"config.yaml": b"a: 2\n"})
        assert names(run_dir) == ["config.yaml", "mine.txt", "notes"]
        moved = {str(p.relative_to(kept)): p.read_bytes() for p in kept.rglob("*") if p.is_file()}
        assert moved == before  # whole, .hydra/ and tensorboard/ as they were
        assert run.diverged("loss is nan at step 3").endswith(
            f"(the finished run it replaced is kept in {kept})"
        )
        run.finish()
        assert not kept.exists()
        run.finish()  # nothing left to remove


# -- the held log lines ------------------------------------------------------------------------


@pytest.fixture
def file_handler(tmp_path: Path):
    root = logging.getLogger()
    handler = logging.FileHandler(tmp_path / "run" / "train.log", delay=True)
    handler.setFormatter(logging.Formatter("%(message)s"))
    level = root.level
    root.setLevel(logging.INFO)
    root.addHandler(handler)
    yield handler
    root.removeHandler(handler)
    handler.close()
    root.setLevel(level)


def test_log_lines_are_held_until_the_commit_then_written(tmp_path: Path, file_handler):
    run_dir = tmp_path / "run"
    log = logging.getLogger("reweight.test_run_dir_commit")
    with RunDir(run_dir) as run:
        assert file_handler not in logging.getLogger().handlers  # held back
        log.info("before the step")
        assert not (run_dir / "train.log").exists()
        run.commit({})
        assert file_handler in logging.getLogger().handlers
        log.info("after the step")
        assert (run_dir / "train.log").read_text() == "before the step\nafter the step\n"
    assert file_handler not in logging.getLogger().handlers  # handed back: nothing more
    log.info("the next job")
    assert (run_dir / "train.log").read_text() == "before the step\nafter the step\n"


def test_log_lines_of_a_run_that_never_commits_are_dropped(tmp_path: Path, file_handler):
    with RunDir(tmp_path / "run"):
        logging.getLogger("reweight.test_run_dir_commit").info("dropped")
    assert not (tmp_path / "run").exists()
    assert all(
        not isinstance(h, logging.FileHandler) or h is not file_handler
        for h in logging.getLogger().handlers
    )
    assert all(type(h).__name__ != "HeldLogs" for h in logging.getLogger().handlers)


def test_starting_over_removes_the_old_log_and_writes_the_new_lines(tmp_path: Path, file_handler):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old_run(run_dir, finished=False)
    (run_dir / "train.log").write_text("the old run\n")
    with RunDir(run_dir) as run:
        run.check("a: 2\n", resume=False, max_steps=4)
        logging.getLogger("reweight.test_run_dir_commit").info("the new run")
        run.commit({})
    assert (run_dir / "train.log").read_text() == "the new run\n"


def test_a_finished_run_moves_beside_with_its_log(tmp_path: Path, file_handler):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old_run(run_dir, finished=True)
    (run_dir / "train.log").write_text("the old run\n")
    with RunDir(run_dir) as run:
        run.check("a: 2\n", resume=False, max_steps=4)
        run.commit({})
    assert (tmp_path / "run.replaced" / "train.log").read_text() == "the old run\n"
    assert not (tmp_path / "run.replaced" / "mine.txt").exists()


# -- the lock ----------------------------------------------------------------------------------


def test_one_run_per_folder_names_the_process_holding_it(tmp_path: Path):
    with RunDir(tmp_path, dir_key="hydra.run.dir"):
        with pytest.raises(RunDirError) as info, RunDir(tmp_path, dir_key="hydra.run.dir"):
            pass
        assert str(info.value) == (
            f"{tmp_path} is in use by process {os.getpid()}, another run into the same folder: "
            "wait for it to end (or stop it), or choose another hydra.run.dir"
        )
        with RunDir(tmp_path, lock=False):  # another rank of the same run
            pass
    with RunDir(tmp_path):  # released with the first
        pass


def test_a_folder_made_by_the_commit_is_locked_then(tmp_path: Path):
    run_dir = tmp_path / "run"
    with RunDir(run_dir) as run:
        run.commit({})
        with pytest.raises(RunDirError, match="is in use by process"), RunDir(run_dir):
            pass
    with RunDir(run_dir):
        pass


# -- a run that diverged -----------------------------------------------------------------------


def test_a_divergence_before_the_commit_writes_nothing(tmp_path: Path):
    with RunDir(tmp_path / "run") as run:
        message = run.diverged("loss is nan at step 1")
    assert message == (
        f"loss is nan at step 1; nothing was written to {tmp_path / 'run'}: run again with a "
        "lower optimizer.lr or with trainer.grad_clip"
    )
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("step", [3, None])
def test_a_divergence_after_the_commit_is_recorded(tmp_path: Path, step):
    with RunDir(tmp_path) as run:
        run.commit({})
        if step is not None:
            torch.save({"step": step}, tmp_path / "checkpoint.pt")
        message = run.diverged("loss is nan at step 5")
    assert json.loads((tmp_path / "diverged.json").read_text()) == {
        "reason": "loss is nan at step 5",
        "checkpoint_step": step,
    }
    fix = "run again with a lower optimizer.lr or with trainer.grad_clip"
    if step is None:
        kept = "no checkpoint was written before it: to start again"
    else:
        kept = f"{tmp_path / 'checkpoint.pt'} (step 3), the last finite checkpoint, is kept: to "
        kept += "continue from it"
    assert message == f"loss is nan at step 5; {kept} {fix}"


def diverged_run(folder: Path, record: dict) -> dict:
    config = {"optimizer": {"lr": 0.1}, "trainer": {"grad_clip": None, "max_steps": 4}, "b": 1}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    torch.save({"step": 2}, folder / "checkpoint.pt")
    (folder / "diverged.json").write_text(json.dumps(record))
    return config


@pytest.mark.parametrize(
    ("record", "reason", "kept"),
    [
        (
            {"reason": "loss is inf", "checkpoint_step": 2},
            "loss is inf",
            "its checkpoint at step 2",
        ),
        ({}, "NaN/inf", "the start"),
    ],
)
def test_a_diverged_run_is_not_resumed_unchanged(tmp_path: Path, record, reason, kept):
    config = diverged_run(tmp_path, record)
    with pytest.raises(RunDirError) as info, RunDir(tmp_path) as run:
        run.check(yaml.safe_dump(config), resume=True, max_steps=4)
    assert str(info.value) == (
        f"{tmp_path} holds a run that diverged ({reason}): to continue from {kept} run again "
        "with a lower optimizer.lr or with trainer.grad_clip; resume=false starts over"
    )


def test_a_diverged_run_resumes_with_a_lower_lr_or_a_clip(tmp_path: Path):
    config = diverged_run(tmp_path, {"reason": "nan", "checkpoint_step": 2})
    config["optimizer"]["lr"] = 0.01
    with RunDir(tmp_path) as run:
        assert run.check(yaml.safe_dump(config), resume=True, max_steps=4) is None
        assert run.lr_change == (0.1, 0.01)
        run.commit({})
    assert not (tmp_path / "diverged.json").exists()
    assert (tmp_path / "checkpoint.pt").exists()  # resumed, not started over
    config["optimizer"]["lr"] = 0.1
    config["trainer"]["grad_clip"] = 1.0
    (tmp_path / "diverged.json").write_text("{}")
    with RunDir(tmp_path) as run:
        assert run.check(yaml.safe_dump(config), resume=True, max_steps=4) is None
        assert run.lr_change is None
    config["b"] = 2  # and another change: refused, naming it alone
    with pytest.raises(RunDirError) as info, RunDir(tmp_path) as run:
        run.check(yaml.safe_dump(config), resume=True, max_steps=4)
    assert "another config (b: 1 there, 2 here)" in str(info.value)


# -- the checks before anything is written -----------------------------------------------------


def test_a_checkpoint_past_max_steps_is_refused_with_the_way_on(tmp_path: Path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(OLD))
    # with tensors, as a real checkpoint: read to the CPU, without unpickling code
    torch.save({"step": 6, "model": {"w": torch.ones(2)}}, tmp_path / "checkpoint.pt")
    with RunDir(tmp_path, dir_key="hydra.run.dir") as run:
        with pytest.raises(RunDirError) as info:
            run.check(yaml.safe_dump(OLD), resume=True, max_steps=5)
        assert str(info.value) == (
            f"{tmp_path} holds this run at step 6, past trainer.max_steps=5: give "
            "trainer.max_steps=6 or more to continue it, resume=false to start over there, or "
            "choose another hydra.run.dir"
        )
        assert run.check(yaml.safe_dump(OLD), resume=True, max_steps=6) is None


def test_an_unreadable_checkpoint_is_left_to_the_resume(tmp_path: Path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(OLD))
    (tmp_path / "checkpoint.pt").write_text("not a checkpoint")
    (tmp_path / "summary.json").write_text("{}")
    with RunDir(tmp_path) as run:
        assert run.check(yaml.safe_dump(OLD), resume=True, max_steps=4) is None
        run.commit({})
    assert not (tmp_path / "checkpoint.pt").exists()  # no step: the run starts over


def test_a_schedule_that_follows_max_steps_names_the_override(tmp_path: Path):
    old = {"trainer": {"max_steps": 4}, "scheduler": {"T_max": 4}, "other": 4}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    new = {"trainer": {"max_steps": 8}, "scheduler": {"T_max": 8}, "other": 4}
    with pytest.raises(RunDirError) as info, RunDir(tmp_path, dir_key="d") as run:
        run.check(yaml.safe_dump(new), resume=True, max_steps=8)
    assert str(info.value) == (
        f"{tmp_path} holds this run with trainer.max_steps=4, and scheduler.T_max follows "
        "trainer.max_steps (4 there, 8 here): a run cannot go on with a schedule of another "
        "length; to continue it on its schedule add scheduler.T_max=4, to start over there run "
        "with resume=false"
    )
    new["other"] = 5  # another change too: the plain refusal, both keys named
    with pytest.raises(RunDirError) as info, RunDir(tmp_path, dir_key="d") as run:
        run.check(yaml.safe_dump(new), resume=True, max_steps=8)
    assert str(info.value).startswith(  # safe_dump sorts the keys
        f"{tmp_path} holds a run with another config (other: 4 there, 5 here; scheduler.T_max: "
        "4 there, 8 here): to start over"
    )
    old["scheduler"]["T_max"] = 8  # a key equal to the old length but not following it
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    new = {"trainer": {"max_steps": 4}, "scheduler": {"T_max": 4}, "other": 4}
    with pytest.raises(RunDirError, match="another config"), RunDir(tmp_path) as run:
        run.check(yaml.safe_dump(new), resume=True, max_steps=4)


def test_a_file_in_the_way_is_named(tmp_path: Path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError) as info, RunDir(tmp_path / "file" / "run", "d") as run:
        run.check("a: 1\n", resume=True, max_steps=4)
    assert str(info.value) == (
        f"{tmp_path / 'file'} is a file, not a folder: choose another d or move the file"
    )


def test_an_unwritable_parent_is_named(tmp_path: Path, denied):
    refused, asked = denied
    refused.add(tmp_path)
    with pytest.raises(RunDirError) as info, RunDir(tmp_path / "a" / "run", "d") as run:
        run.check("a: 1\n", resume=True, max_steps=4)
    assert str(info.value) == (
        f"cannot write to {tmp_path} (Permission denied): choose another d or fix the permissions"
    )
    assert asked == [(tmp_path, os.W_OK | os.X_OK)]


def test_an_existing_runs_hydra_folder_and_log_are_checked(tmp_path: Path, denied, file_handler):
    refused, asked = denied
    run_dir = tmp_path / "run"
    (run_dir / ".hydra").mkdir(parents=True)
    (run_dir / "train.log").write_text("old\n")
    with RunDir(run_dir) as run:
        assert run.check("a: 1\n", resume=True, max_steps=4) is None
        assert asked == [
            (run_dir, os.W_OK | os.X_OK),
            (run_dir / ".hydra", os.W_OK | os.X_OK),
            (run_dir / "train.log", os.W_OK),
        ]
        refused.add(run_dir / "train.log")
        with pytest.raises(RunDirError, match=r"^cannot write to \S+train\.log \(Permission"):
            run.check("a: 1\n", resume=True, max_steps=4)


def test_a_finished_run_needs_a_writable_folder_beside_it(tmp_path: Path, denied):
    refused, asked = denied
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old_run(run_dir, finished=True)
    with RunDir(run_dir) as run:
        assert run.check("a: 2\n", resume=False, max_steps=4) is None
        assert asked[-1] == (tmp_path, os.W_OK | os.X_OK)  # where run.replaced goes
        refused.add(tmp_path)
        with pytest.raises(RunDirError, match=f"^cannot write to {tmp_path} "):
            run.check("a: 2\n", resume=False, max_steps=4)
        (run_dir / "summary.json").unlink()  # unfinished: nothing moves beside it
        assert run.check("a: 2\n", resume=False, max_steps=4) is None


# -- Hydra's files and the callback ------------------------------------------------------------


def test_hydra_files_outside_hydra_are_none(monkeypatch):
    from hydra.core.hydra_config import HydraConfig

    # a Hydra app run earlier in this process (another test) leaves its config set: unset it
    monkeypatch.setattr(HydraConfig.instance(), "cfg", None)
    assert hydra_files(OmegaConf.create({"a": 1})) == {}


def test_the_folders_hydra_made_for_a_run_go_when_still_empty(tmp_path: Path):
    run_dir = tmp_path / "x" / "y" / "run"
    callback = RunDirCleanup()
    callback.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}}))
    run_dir.mkdir(parents=True)
    callback._remove_empty()
    assert not (tmp_path / "x").exists() and tmp_path.exists()
    run_dir.mkdir(parents=True)
    (tmp_path / "x" / "y" / "kept").write_text("a file")
    callback._remove_empty()
    assert not run_dir.exists() and (tmp_path / "x" / "y" / "kept").exists()


def test_a_failed_sweep_job_leaves_none_of_its_new_folders(tmp_path: Path):
    sweep = tmp_path / "sweep"
    (sweep / "old" / "empty").mkdir(parents=True)  # there before: stays
    callback = RunDirCleanup()
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    job = sweep / "new" / "0"
    job.mkdir(parents=True)

    class Failed:
        from hydra.core.utils import JobStatus

        status = JobStatus.FAILED

    class Done:
        from hydra.core.utils import JobStatus

        status = JobStatus.COMPLETED

    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(job)}}})
    callback.on_job_end(config, Done())
    assert job.exists()
    callback.on_job_end(config, Failed())
    assert not (sweep / "new").exists() and (sweep / "old" / "empty").exists()
    job.mkdir(parents=True)
    (job / "file").write_text("x")
    callback.on_job_end(config, Failed())  # not empty: stays
    assert (job / "file").exists()
    (job / "file").unlink()
    (sweep / "made").mkdir()
    callback._remove_empty()
    assert sorted(names(tmp_path)) == ["sweep", "sweep/old", "sweep/old/empty"]


def test_a_sweep_folder_made_by_hydra_goes_when_empty(tmp_path: Path):
    sweep = tmp_path / "a" / "sweep"
    callback = RunDirCleanup()
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": str(sweep)}}}))
    (sweep / "0").mkdir(parents=True)
    callback._remove_empty()
    assert names(tmp_path) == []


def test_a_sweep_dir_hydra_resolves_later_is_skipped(tmp_path: Path):
    callback = RunDirCleanup()
    callback.on_multirun_start(OmegaConf.create({"hydra": {"sweep": {"dir": "${hydra:x}"}}}))
    callback.on_multirun_start(OmegaConf.create({"hydra": {}}))
    callback._remove_empty()  # nothing recorded, nothing removed
    assert tmp_path.exists()


# -- what a mutation run of run_dir.py left open -----------------------------------------------


def test_a_commit_takes_the_held_logs_off_the_root_logger(tmp_path: Path, file_handler):
    with RunDir(tmp_path / "run") as run:
        assert any(type(h).__name__ == "HeldLogs" for h in logging.getLogger().handlers)
        run.commit({})
        assert not any(type(h).__name__ == "HeldLogs" for h in logging.getLogger().handlers)


def test_the_holder_of_the_lock_is_read_from_proc_locks(tmp_path: Path, monkeypatch):
    """The line of this folder's FLOCK, among a POSIX lock on it, a waiter ("->", no pid in
    its place) and locks of other files."""
    real = Path.read_text
    st = os.stat(tmp_path)
    where = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    lines = [
        "1: FLOCK  ADVISORY  WRITE 11 00:01:1 0 EOF",
        f"2: POSIX  ADVISORY  WRITE 12 {where} 0 EOF",
        f"3: -> FLOCK  ADVISORY  WRITE 13 {where} 0 EOF",
        f"4: FLOCK  ADVISORY  WRITE 4242 {where} 0 EOF",
    ]

    def read_text(self, *args, **kwargs):
        return (
            "\n".join(lines) + "\n" if str(self) == "/proc/locks" else real(self, *args, **kwargs)
        )

    with RunDir(tmp_path):
        monkeypatch.setattr(Path, "read_text", read_text)
        with pytest.raises(RunDirError, match=r" is in use by process 4242, "), RunDir(tmp_path):
            pass
        lines.pop()  # no line of its own: the process is not named
        with pytest.raises(RunDirError, match=r" is in use by another process, "), RunDir(tmp_path):
            pass


def test_unreadable_records_are_named(tmp_path: Path, monkeypatch):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(OLD))
    torch.save({"step": 4}, tmp_path / "checkpoint.pt")
    (tmp_path / "summary.json").write_text("[0.5]")  # not a record: no accuracy in it
    found = RunDir(tmp_path).check(yaml.safe_dump(OLD), resume=True, max_steps=4)
    assert found is not None and found.step == 4 and found.test_accuracy != found.test_accuracy
    (tmp_path / "summary.json").write_text("{")
    with pytest.raises(RunDirError) as info:
        RunDir(tmp_path).check(yaml.safe_dump(OLD), resume=True, max_steps=4)
    assert str(info.value).startswith(f"cannot read {tmp_path / 'summary.json'} (")
    assert str(info.value).endswith(
        "): delete it and run again (the run writes it anew), or start over there with resume=false"
    )
    real = Path.read_text

    def read_text(self, *args, **kwargs):
        if self.name == "config.yaml":
            raise PermissionError(13, "Permission denied")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Path, "read_text", read_text)
    with pytest.raises(RunDirError) as info:
        RunDir(tmp_path).check(yaml.safe_dump(OLD), resume=True, max_steps=4)
    assert str(info.value) == (
        f"cannot read {tmp_path / 'config.yaml'} (Permission denied): fix the permissions, or "
        "start over there with resume=false"
    )


def test_a_diverged_record_that_is_not_a_mapping_reads_as_empty(tmp_path: Path):
    config = diverged_run(tmp_path, {})
    (tmp_path / "diverged.json").write_text("[1, 2]")
    with pytest.raises(RunDirError, match=r"diverged \(NaN/inf\): to continue from the start"):
        RunDir(tmp_path).check(yaml.safe_dump(config), resume=True, max_steps=4)


def test_two_keys_that_follow_max_steps_are_both_named(tmp_path: Path):
    old = {"trainer": {"max_steps": 4}, "a": {"T_max": 4}, "b": {"total": 4}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(old))
    new = {"trainer": {"max_steps": 8}, "a": {"T_max": 8}, "b": {"total": 8}}
    with pytest.raises(RunDirError) as info:
        RunDir(tmp_path).check(yaml.safe_dump(new), resume=True, max_steps=8)
    assert ", and a.T_max, b.total follows trainer.max_steps (4 there, 8 here)" in str(info.value)
    assert "add a.T_max=4, to start over" in str(info.value)


def test_a_failed_single_run_removes_only_the_folders_made_for_it(tmp_path: Path):
    from hydra.core.utils import JobStatus

    class Failed:
        status = JobStatus.FAILED

    there = tmp_path / "there"  # existed, empty: stays
    there.mkdir()
    run_dir = there / "x" / "run"
    callback = RunDirCleanup()
    callback.on_run_start(OmegaConf.create({"hydra": {"run": {"dir": str(run_dir)}}}))
    run_dir.mkdir(parents=True)
    config = OmegaConf.create({"hydra": {"runtime": {"output_dir": str(run_dir)}}})
    callback.on_job_end(config, Failed())
    assert there.is_dir() and not (there / "x").exists()


def test_a_run_dir_named_none_is_not_taken_for_a_missing_setting(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    callback = RunDirCleanup()
    callback.on_multirun_start(OmegaConf.create({"hydra": {}}))
    callback.on_run_start(OmegaConf.create({"hydra": {}}))
    (tmp_path / "None").mkdir()  # what str(None) would name, made by the job
    callback._remove_empty()
    assert (tmp_path / "None").is_dir()


def test_hydra_files_are_the_jobs_config_hydras_and_the_overrides():
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from hydra.core.hydra_config import HydraConfig

    GlobalHydra.instance().clear()
    try:
        with initialize_config_module("reweight.conf", version_base="1.3"):
            cfg = compose("config", overrides=["seed=3"], return_hydra_config=True)
            HydraConfig.instance().set_config(cfg)
            hydra_cfg = HydraConfig.instance().cfg
            job = OmegaConf.masked_copy(cfg, [k for k in cfg if k != "hydra"])
            files = hydra_files(job)
    finally:
        GlobalHydra.instance().clear()
        HydraConfig.instance().cfg = None
    assert list(files) == [".hydra/config.yaml", ".hydra/hydra.yaml", ".hydra/overrides.yaml"]
    assert files[".hydra/config.yaml"] == OmegaConf.to_yaml(job).encode()
    assert files[".hydra/hydra.yaml"] == OmegaConf.to_yaml(hydra_cfg).encode()
    assert files[".hydra/overrides.yaml"] == b"- seed=3\n"
    assert yaml.safe_load(files[".hydra/config.yaml"])["seed"] == 3


def test_a_run_dir_used_twice_locks_each_time_and_names_its_setting(tmp_path: Path):
    run = RunDir(tmp_path)
    assert run.lr_change is None
    with run:
        pass
    with run, pytest.raises(RunDirError, match="is in use by process"), RunDir(tmp_path):
        pass
    (tmp_path / "file").write_text("x")
    with pytest.raises(RunDirError, match=r"not a folder: choose another run_dir or move"):
        RunDir(tmp_path / "file").check("a: 1\n", resume=True, max_steps=1)


class _NotWeights:
    """A pickled object torch.load refuses with weights_only=True."""


def test_a_checkpoint_that_needs_unpickling_code_is_not_read(tmp_path: Path):
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(OLD))
    torch.save({"step": 6, "obj": _NotWeights()}, tmp_path / "checkpoint.pt")
    with RunDir(tmp_path) as run:  # no step read: the resume reports the checkpoint
        assert run.check(yaml.safe_dump(OLD), resume=True, max_steps=5) is None
