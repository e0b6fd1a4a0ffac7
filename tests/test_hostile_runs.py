"""Hostile use of run directories, checkpoints and metrics, as a new user (or a scheduler) does it.

Each case asserts the exit status, one line without a traceback naming the file, key or path, and
that nothing was lost: earlier checkpoints load, metrics history is intact, and the failed command
can be retried once the cause is fixed. docs/GUARANTEES.md states the promises these tests keep.
Data-side cases (images, manifests, folders, small CLI mistakes) are in test_hostile_data.py.
"""

import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import safetensors.torch
import torch
from conftest import assert_one_line, cli

from motfusion.cli import main, os_error_text
from motfusion.objectives import TransfusionObjective
from motfusion.training import checkpoint, files
from motfusion.training.checkpoint import list_checkpoints, load_model, load_train_state
from motfusion.training.files import LOCK_FILE, RunLock
from motfusion.training.logging import METRICS_FILE, parse_metrics, read_metrics

FAST = ["train.tensorboard=false", "train.log_every=1", "train.warmup=0"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}


def snapshot(run: Path) -> dict:
    return {"metrics": (run / METRICS_FILE).read_bytes(), "ckpts": [c.name for c in list_checkpoints(run)]}


def assert_intact(run: Path, before: dict) -> None:
    """Nothing lost: the same history, byte for byte, and every earlier checkpoint still loads."""
    assert (run / METRICS_FILE).read_bytes() == before["metrics"]
    assert [c.name for c in list_checkpoints(run)] == before["ckpts"]
    for ckpt in list_checkpoints(run):
        load_model(ckpt)
        load_train_state(ckpt)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory) -> Path:
    """A 2-step run with a checkpoint at each step, shared by the cases (each works on a copy)."""
    run = tmp_path_factory.mktemp("base") / "run"
    assert (
        main(
            [
                "train",
                "--recipe",
                "debug",
                "--out",
                str(run),
                "--steps",
                "2",
                *FAST,
                "train.checkpoint_every=1",
            ]
        )
        == 0
    )
    return run


@pytest.fixture
def run(base_run, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(base_run, copy)
    return copy


def resume(capsys, run: Path, steps: int = 3, *extra: str) -> tuple[int, str, str]:
    return cli(capsys, "train", "--out", run, "--resume", f"train.steps={steps}", *extra)


@pytest.fixture
def mounts(tmp_path):
    """Real file systems for the cases a chmod cannot make as root: a small tmpfs (full disk) and
    read-only bind mounts. Skipped where mounting is not allowed; everything is unmounted after."""
    made = []

    def mount(*args: str, point: Path) -> Path:
        if subprocess.run(["mount", *args, str(point)], capture_output=True).returncode:
            pytest.skip("needs permission to mount file systems")
        made.append(point)
        return point

    def tmpfs(name: str, size: str) -> Path:
        point = tmp_path / name
        point.mkdir()
        return mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", point=point)

    def read_only(path: Path) -> Path:
        if os.geteuid() != 0:
            path.chmod(0o555)
            return path
        mount("--bind", str(path), point=path)
        subprocess.run(["mount", "-o", "remount,ro,bind", str(path)], check=True)
        return path

    yield tmpfs, read_only
    for point in reversed(made):
        subprocess.run(["umount", "-l", str(point)], capture_output=True)


# ---- 1. one writer per run directory --------------------------------------------------------------

# Another process holding a run the way RunLock does (flock on RUN/.lock, its PID inside), without the
# seconds of importing torch; test_a_training_process_holds_its_run_until_sigterm uses a real run.
HOLD = (
    "import fcntl, os, sys; fd = os.open(os.path.join(sys.argv[1], '.lock'), os.O_RDWR | os.O_CREAT); "
    "fcntl.flock(fd, fcntl.LOCK_EX); os.pwrite(fd, f'{os.getpid()}\\n'.encode(), 0); "
    "print('held', flush=True); sys.stdin.read()"
)


def test_second_writer_is_refused_naming_the_pid_and_a_killed_holder_is_taken_over(run, capsys):
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(run)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=ENV,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(run)
        for argv in (
            ["--resume", "train.steps=3"],
            ["--recipe", "debug", "train.seed=7"],
        ):  # with and without
            code, out, err = cli(capsys, "train", "--out", run, *argv)
            assert code == 2
            assert_one_line(err, str(run), f"process {holder.pid}", "in use")
            assert "step" not in out
        assert_intact(run, before)
        assert json.loads((run / "config.json").read_text())["train"]["seed"] == 0  # not the second run's
    finally:
        holder.kill()  # SIGKILL: the lock file still names it, the OS lock is gone
        holder.wait()
    assert (run / LOCK_FILE).read_text().strip() == str(holder.pid)
    code, out, err = resume(capsys, run)
    assert code == 0 and f"took over {run / LOCK_FILE} from process {holder.pid}" in out
    assert (run / LOCK_FILE).read_text() == ""  # a clean exit leaves nothing stale
    assert [r["step"] for r in read_metrics(run / METRICS_FILE)] == [1, 2, 3]


def test_a_training_process_holds_its_run_until_sigterm(tmp_path, capsys):
    run = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "motfusion",
            "train",
            "--recipe",
            "debug",
            "--out",
            str(run),
            "--steps",
            "100000",
            *FAST,
        ],
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        deadline = time.time() + 120
        while not read_metrics(run / METRICS_FILE):
            assert proc.poll() is None and time.time() < deadline
            time.sleep(0.1)
        code, _, err = cli(capsys, "train", "--out", run, "--resume", "train.steps=100000")
        assert code == 2
        assert_one_line(err, f"process {proc.pid}")
    finally:
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=120) == 0, proc.stderr.read()
    last = list_checkpoints(run)[-1]
    load_model(last)
    code, _, _ = resume(capsys, run, int(last.name[5:]) + 1)  # released: the run continues
    assert code == 0


def test_lock_is_released_when_training_fails(tmp_path, capsys):
    run = tmp_path / "run"
    code, _, err = cli(
        capsys, "train", "--recipe", "debug", "--out", run, "--steps", "1", *FAST, "train.seq_len=8"
    )
    assert code == 2 and "train.seq_len" in err
    with RunLock(run) as lock:
        assert lock.stale is None


# ---- 2. training that cannot mean anything stops, and never saves broken weights ------------------


@pytest.mark.parametrize(
    "override, key",
    [
        ("train.beta1=1.5", "train.beta1"),
        ("train.beta2=-0.5", "train.beta2"),
        ("train.weight_decay=-0.1", "train.weight_decay"),
        ("train.lr=nan", "train.lr"),
        ("train.grad_clip=nan", "train.grad_clip"),
    ],
)
def test_meaningless_hyper_parameters_stop_without_a_checkpoint(tmp_path, capsys, override, key):
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--recipe", "debug", "--out", run, "--steps", "2", *FAST, override)
    assert code == 2
    assert_one_line(err, key)
    assert list_checkpoints(run) == []


@pytest.mark.parametrize(
    "override",
    [
        "train.lr=inf",
        "train.min_lr=nan",
        "train.beta1=1.0",
        "train.ema=nan",
        "train.seed=-1",
        "train.keep_checkpoints=-2",
        "objective.num_timesteps=0",
        "objective.image_loss_weight=nan",
        "objective.cfg_dropout=inf",
        "model.norm_eps=0",
        "model.rope_theta=-1",
        "data.single_object_prob=2",
        "data.max_objects=0",
        "data.val_fraction=nan",
        "model.ffn_dim=-64",
    ],
)
def test_every_numeric_key_is_checked_for_finiteness_and_range(capsys, override):
    code, out, err = cli(capsys, "config", "--recipe", "debug", override)
    assert code == 2 and out == ""
    assert_one_line(err, override.split("=")[0])


def _poison_weights_at(monkeypatch, bad_step: int) -> None:
    """An optimizer update that turns the weights to nan at `bad_step`, with a finite loss."""
    real, calls = torch.optim.AdamW.step, [0]

    def step(self, *args, **kwargs):
        result = real(self, *args, **kwargs)
        calls[0] += 1
        if calls[0] == bad_step:
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("nan"))
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step)


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    _poison_weights_at(monkeypatch, 2)
    code, _, err = cli(
        capsys, "train", "--recipe", "debug", "--out", run, "--steps", "3", *FAST, "train.checkpoint_every=1"
    )
    assert code == 2
    assert_one_line(
        err, "weights became non-finite", f"last good checkpoint is {run / 'checkpoints' / 'step_00000001'}"
    )
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001"]
    model, _, _ = load_model(run)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_run_whose_every_step_was_skipped_exits_non_zero(tmp_path, capsys, monkeypatch):
    real = TransfusionObjective.__call__
    monkeypatch.setattr(
        TransfusionObjective,
        "__call__",
        lambda self, *a, **k: (lambda loss, parts: (loss * float("nan"), parts))(*real(self, *a, **k)),
    )
    run = tmp_path / "run"
    code, _, err = cli(capsys, "train", "--recipe", "debug", "--out", run, "--steps", "2", *FAST)
    assert code == 2
    assert_one_line(err, "all 2 steps", "skipped", "no checkpoint was written")
    assert list_checkpoints(run) == []


# ---- 4. hand-edited or damaged metadata ---------------------------------------------------------

CONFIG_DAMAGE = {
    "a list": ("[1, 2]", ["a list"]),
    "null": ("null", ["null"]),
    "not json": ('{"model": {"dim": 6', ["not valid JSON"]),
    "section a list": ('{"model": [64]}', ["'model'", "a list"]),
    "unknown key": ('{"train": {"lrr": 0.1}}', ["train.lrr"]),
}


@pytest.mark.parametrize("case", list(CONFIG_DAMAGE))
def test_damaged_checkpoint_config_is_one_line_naming_the_file(run, tmp_path, capsys, case):
    text, phrases = CONFIG_DAMAGE[case]
    path = list_checkpoints(run)[-1] / "config.json"
    good = path.read_text()
    path.write_text(text)
    code, _, err = cli(capsys, "export", "--ckpt", run, "--out", tmp_path / "share" / "m.safetensors")
    assert code == 2
    assert_one_line(err, str(path), *phrases)
    path.write_text(good)  # fixed: the same command works
    assert cli(capsys, "export", "--ckpt", run, "--out", tmp_path / "share" / "m.safetensors")[0] == 0


@pytest.mark.parametrize(
    "section, key, value",
    [
        ("train", "lr", "fast"),
        ("model", "dim", "64"),
        ("train", "steps", None),
        ("data", "image_size", [32]),
        ("train", "seed", 1.5),
        ("model", "untie", "ffn"),
        ("train", "tensorboard", "yes"),
    ],
)
def test_wrong_type_in_run_config_names_file_and_key(run, capsys, section, key, value):
    path = run / "config.json"
    good = path.read_text()
    d = json.loads(good)
    d[section][key] = value
    path.write_text(json.dumps(d))
    before = snapshot(run)
    code, out, err = resume(capsys, run)
    assert code == 2
    assert_one_line(err, str(path), f"{section}.{key}")
    assert_intact(run, before)
    path.write_text(good)
    assert resume(capsys, run)[0] == 0


def _export(run: Path, out: Path, metadata_config: str) -> Path:
    assert main(["export", "--ckpt", str(run), "--out", str(out)]) == 0
    with safetensors.safe_open(out, framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    safetensors.torch.save_file(
        tensors, out, metadata={**metadata, checkpoint.CONFIG_METADATA: metadata_config}
    )
    return out


@pytest.mark.parametrize("text, phrase", [("{not json", "not valid JSON"), ("[]", "a list")])
def test_export_whose_config_metadata_is_damaged(run, tmp_path, capsys, text, phrase):
    out = _export(run, tmp_path / "share" / "m.safetensors", text)
    capsys.readouterr()
    code, _, err = cli(
        capsys,
        "generate",
        "--ckpt",
        out,
        "--prompt",
        "a red square",
        "--steps",
        "2",
        "--out",
        tmp_path / "samples",
    )
    assert code == 2
    assert_one_line(err, str(out), checkpoint.CONFIG_METADATA, phrase)


@pytest.mark.parametrize(
    "damage, phrase",
    [
        (lambda s: s.pop("step"), "'step' is missing"),
        (lambda s: s.pop("packer"), "'packer' is missing"),
        (lambda s: s.pop("optimizer"), "no optimizer state"),
        (lambda s: s.update(step="abc"), "malformed"),
    ],
)
def test_damaged_train_state_names_file_and_key(run, capsys, damage, phrase):
    path = list_checkpoints(run)[-1] / "train_state.pt"
    good = path.read_bytes()
    state = torch.load(path, weights_only=True)
    damage(state)
    torch.save(state, path)
    code, out, err = resume(capsys, run)
    assert code == 2
    assert_one_line(err, str(path), phrase)
    assert "step 3" not in out
    path.write_bytes(good)
    assert resume(capsys, run)[0] == 0


def test_train_state_that_is_not_a_dict(run, capsys):
    path = list_checkpoints(run)[-1] / "train_state.pt"
    torch.save([1, 2], path)
    code, _, err = resume(capsys, run)
    assert code == 2
    assert_one_line(err, str(path), "must hold a dict")


# ---- 5. file-system errors: found up front, one line with the path and the cause ------------------


def test_out_is_an_existing_file(tmp_path, capsys):
    out = tmp_path / "notes.txt"
    out.write_text("mine")
    code, _, err = cli(capsys, "train", "--recipe", "debug", "--out", out, "--steps", "1", *FAST)
    assert code == 2
    assert_one_line(err, str(out), "is a file")
    assert out.read_text() == "mine"


def test_out_lies_under_a_file(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("mine")
    code, out, err = cli(
        capsys, "train", "--recipe", "debug", "--out", tmp_path / "notes.txt" / "run", "--steps", "1"
    )
    assert code == 2
    assert_one_line(
        err, str(tmp_path / "notes.txt" / "run"), f"lies under {tmp_path / 'notes.txt'}, which is a file"
    )


def test_read_only_out_fails_before_any_step(tmp_path, capsys, mounts):
    _, read_only = mounts
    parent = tmp_path / "ro"
    parent.mkdir()
    read_only(parent)
    code, out, err = cli(capsys, "train", "--recipe", "debug", "--out", parent / "run", "--steps", "1", *FAST)
    assert code == 2 and "step 1" not in out
    assert_one_line(err, str(parent / "run"))


def test_read_only_checkpoints_on_resume_fail_before_any_step(run, capsys, mounts):
    _, read_only = mounts
    before = snapshot(run)
    read_only(run / "checkpoints")
    code, out, err = resume(capsys, run)
    assert code == 2 and "step 3" not in out
    assert_one_line(err, "checkpoints directory", str(run / "checkpoints"))
    assert_intact(run, before)


def test_full_disk_during_a_checkpoint(base_run, tmp_path, capsys, mounts):
    """A real full file system: the first checkpoint fits, the second does not."""
    tmpfs, _ = mounts
    size = sum(f.stat().st_size for f in (base_run / "checkpoints" / "step_00000001").iterdir())
    disk = tmpfs("disk", f"{(size * 3 // 2) // 1024}k")
    run = disk / "run"
    code, _, err = cli(
        capsys, "train", "--recipe", "debug", "--out", run, "--steps", "3", *FAST, "train.checkpoint_every=1"
    )
    assert code == 2
    assert_one_line(err, "no space left on device", "step_00000002", "step_00000001, is intact")
    assert [c.name for c in list_checkpoints(run)] == ["step_00000001"]
    assert not list((run / "checkpoints").glob(".tmp-*"))
    load_model(run)
    assert [r["step"] for r in read_metrics(run / METRICS_FILE)] == [1, 2]


def test_disk_full_in_torch_save_is_one_line_and_the_previous_checkpoint_survives(run, capsys, monkeypatch):
    def full(obj, f):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), f.name)

    monkeypatch.setattr(checkpoint.torch, "save", full)
    before = snapshot(run)
    code, _, err = resume(capsys, run)
    assert code == 2
    assert_one_line(err, "no space left on device", "train_state.pt", "step_00000002, is intact")
    assert [c.name for c in list_checkpoints(run)] == before["ckpts"]
    monkeypatch.undo()
    assert resume(capsys, run)[0] == 0  # space freed: the same command works


def test_writes_go_through_python_files_so_a_full_disk_is_an_oserror(tmp_path):
    """/dev/full fails every write with ENOSPC: what torch.save to a path reports as an
    inline_container.cc error, and safetensors' save_file may not report at all."""
    if not (os.path.exists("/dev/full") and stat.S_ISCHR(os.stat("/dev/full").st_mode)):
        pytest.skip("needs the /dev/full device")
    with pytest.raises(OSError) as info:
        files.write_file(Path("/dev/full"), lambda f: torch.save({"x": torch.zeros(10_000)}, f))
    assert info.value.errno == errno.ENOSPC


@pytest.mark.parametrize(
    "make, phrase",
    [
        (lambda p: p.mkdir(parents=True), "is a directory"),
        (lambda p: p.parent.write_text("x"), "which is a file"),
    ],
)
def test_export_target_that_cannot_be_a_file(run, tmp_path, capsys, make, phrase):
    out = tmp_path / "share" / "m.safetensors"
    make(out)
    code, _, err = cli(capsys, "export", "--ckpt", run, "--out", out)
    assert code == 2
    assert_one_line(err, phrase)


def test_export_into_a_read_only_folder(run, tmp_path, capsys, mounts):
    _, read_only = mounts
    share = tmp_path / "share"
    share.mkdir()
    read_only(share)
    code, _, err = cli(capsys, "export", "--ckpt", run, "--out", share / "m.safetensors")
    assert code == 2
    assert_one_line(err, str(share))


@pytest.mark.parametrize("target", ["dir", "under a file"])
def test_eval_out_is_checked_before_evaluating(run, tmp_path, capsys, monkeypatch, target):
    out = tmp_path / "eval.json"
    if target == "dir":
        out.mkdir()
    else:
        out.write_text("x")
        out = out / "eval.json"
    monkeypatch.setattr("motfusion.cli.evaluate.load_generator", lambda *a, **k: pytest.fail("worked first"))
    code, _, err = cli(capsys, "eval", "--ckpt", run, "--out", out, "--n", "2")
    assert code == 2
    assert_one_line(err, str(out), "is a directory" if target == "dir" else "which is a file")


def test_generate_out_that_is_a_file(run, tmp_path, capsys):
    out = tmp_path / "samples"
    out.write_text("x")
    code, _, err = cli(
        capsys, "generate", "--ckpt", run, "--prompt", "a red square", "--steps", "2", "--out", out
    )
    assert code == 2
    assert_one_line(err, str(out), "is a file")


def test_full_disk_while_appending_metrics_names_the_file(run, capsys, monkeypatch):
    from motfusion.training import logging as train_logging

    class Full:
        def write(self, text):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def close(self):
            pass

    real_init = train_logging.TrainLogger.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)
        self.file.close()
        self.file = Full()

    monkeypatch.setattr(train_logging.TrainLogger, "__init__", init)
    before = snapshot(run)
    code, _, err = resume(capsys, run)
    assert code == 2
    assert_one_line(err, f"metrics to {run / METRICS_FILE}", "no space left on device")
    assert_intact(run, before)


def test_an_oserror_the_cli_did_not_foresee_is_one_line():
    e = OSError(errno.EROFS, os.strerror(errno.EROFS), "/data/run/x")
    assert os_error_text(e) == "/data/run/x: read-only file system"


# ---- 6. metrics.jsonl survives kills and damage --------------------------------------------------


@pytest.mark.parametrize("tail", ['{"step": 3, "loss": 1.', '{"step": 3, "lo\n', "\x00\x00\x00\n"])
def test_torn_last_metrics_line_is_dropped_and_said(run, capsys, tail):
    path = run / METRICS_FILE
    history = read_metrics(path)
    path.write_text(path.read_text() + tail)
    code, out, _ = resume(capsys, run)
    assert code == 0 and "dropped a torn last record" in out and f"{path}:3" in out
    assert read_metrics(path)[:2] == history and [r["step"] for r in read_metrics(path)] == [1, 2, 3]


@pytest.mark.parametrize("bad", ["{broken", "[1, 2]", '{"loss": 1.0}'])
def test_damaged_metrics_line_elsewhere_stops_naming_it_and_changes_nothing(run, capsys, bad):
    path = run / METRICS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + bad + "\n" + "".join(lines[1:]))
    before = snapshot(run)
    code, _, err = resume(capsys, run)
    assert code == 2
    assert_one_line(err, f"{path}:2", "delete or repair that line")
    assert_intact(run, before)
    path.write_text("".join(lines))  # the way forward the message gives
    assert resume(capsys, run)[0] == 0


KILL_IN_REWRITE = """
import os, signal, sys
from motfusion.cli import main
real_replace, real_fsync = os.replace, os.fsync
def replace(src, dst):  # killed after the new history is written, before it replaces the old one
    if str(dst).endswith("metrics.jsonl") and sys.argv[2] == "rename":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_replace(src, dst)
def fsync(fd):  # killed while the new history is being written
    if "metrics.jsonl" in os.readlink(f"/proc/self/fd/{fd}") and sys.argv[2] == "write":
        os.kill(os.getpid(), signal.SIGKILL)
    return real_fsync(fd)
os.replace, os.fsync = replace, fsync
main(["train", "--out", sys.argv[1], "--resume", "train.steps=3"])
"""


def test_kill_during_the_metrics_rewrite_loses_nothing_and_resume_can_be_retried(base_run, tmp_path, capsys):
    runs = {}
    for moment in ("rename", "write"):
        runs[moment] = tmp_path / moment
        shutil.copytree(base_run, runs[moment])
        # A record after the checkpoint's step, which the resume must cut: the file is rewritten.
        with open(runs[moment] / METRICS_FILE, "a") as f:
            f.write(json.dumps({**read_metrics(base_run / METRICS_FILE)[-1], "step": 3}) + "\n")
    before = {m: snapshot(r) for m, r in runs.items()}
    procs = {
        m: subprocess.Popen(
            [sys.executable, "-c", KILL_IN_REWRITE, str(r), m],
            env=ENV,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for m, r in runs.items()
    }
    for moment, proc in procs.items():
        assert proc.wait(timeout=120) == -signal.SIGKILL, moment
        assert_intact(runs[moment], before[moment])  # the old history, whole
        code, _, _ = resume(
            capsys, runs[moment]
        )  # retried: the leftover temp file is cleared, the run goes on
        assert code == 0
        assert [r["step"] for r in read_metrics(runs[moment] / METRICS_FILE)] == [1, 2, 3]
        assert not list(runs[moment].glob(".tmp-*"))


def test_parse_metrics_reports_but_never_raises_on_a_torn_last_line(tmp_path):
    path = tmp_path / METRICS_FILE
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "lo')
    records, note = parse_metrics(path)
    assert records == [{"step": 1, "loss": 2.0}] and note.startswith(f"{path}:2")
