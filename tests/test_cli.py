"""The `sora` command as a user runs it: a real subprocess of the installed console script."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SORA = shutil.which("sora", path=str(Path(sys.executable).parent)) or "sora"
COMMANDS = (
    "preprocess",
    "bucket-report",
    "train",
    "search-batch-size",
    "sample",
    "demo-data",
    "demo-eval",
    "debug-models",
    "fit-demo-vae",
    "config",
)
GROUPS = {"cache": ["verify"]}  # sora GROUP COMMAND

# What each command's --help must list: its arguments (by metavar) and its options, short forms included.
# Written out here, not read from cli.py: a flag that disappears from the CLI fails the test.
HELP = {
    "demo-data": (["out_dir"], ["--num", "-n", "--seed"]),
    "demo-eval": (["SAMPLES_DIR"], ["--prompts", "--sheet", "--json"]),
    "debug-models": (["out_dir"], ["--seed"]),
    "fit-demo-vae": (["out_dir"], ["--steps", "--seed"]),
    "config": (["CONFIG"], ["--kind"]),
    "preprocess": (["DATA.csv"], ["--config", "-c", "--cache-dir", "--address"]),
    "bucket-report": (["source"], ["--config", "-c", "--json", "--plot"]),
    "train": (
        ["CONFIG"],
        "--data-path --outputs --load --ckpt-path --num-workers --gpu --no-gpu --address --batch-size --lr --epochs "
        "--seed --wandb --no-wandb --sp-size".split(),
    ),
    "search-batch-size": (
        ["CONFIG"],
        "--max-memory --gpu --no-gpu --equalize --no-equalize --base --max-batch --steps --text-dim".split(),
    ),
    "sample": (
        ["CONFIG"],
        "--prompt --prompt-path --ckpt-path --save-dir --num-frames --image-size --fps --num-sampling-steps "
        "--cfg-scale --seed --batch-size --loop --condition-frame-length --reference-path --mask-strategy".split(),
    ),
}
REQUIRED = {"preprocess": ["--config", "-c"], "bucket-report": ["--config", "-c"]}  # options marked required (*)


def sora(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    # A wide terminal: rich would otherwise wrap or cut the help's table in a narrow one.
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "NO_COLOR": "1", "COLUMNS": "200", "TERMINAL_WIDTH": "200"}
    return subprocess.run([SORA, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def help_rows(text: str, box: str) -> dict[str, tuple[bool, list[str]]]:
    """The rows of one box ("Options", "Arguments", "Commands") of rich's help table.

    Each name in a row (an option's long and short forms, `--gpu/--no-gpu` both) maps to
    (marked required with `*`, the row's other words). Names start in the box's first
    column; a line that starts further right continues the help of the row above.
    """
    rows: dict[str, tuple[bool, list[str]]] = {}
    lines = text.splitlines()
    top = next((i for i, line in enumerate(lines) if line.startswith(f"╭─ {box} ")), None)
    if top is None:
        return rows
    body = []
    for line in lines[top + 1 :]:
        if line.startswith("╰"):
            break
        body.append(line.strip().strip("│").rstrip())
    name_column = min(len(line) - len(line.lstrip(" *")) for line in body if line.strip())
    words: list[str] = []
    for line in body:
        if len(line) - len(line.lstrip(" *")) > name_column:
            words.extend(line.split())  # a wrapped line of the row above
            continue
        required, tokens = line.lstrip().startswith("*"), line.lstrip(" *").split()
        count = 1 if box != "Options" else next(i for i, t in enumerate([*tokens, ""]) if not t.startswith("-"))
        words = tokens[count:]
        for name in tokens[:count]:
            rows[name] = (required, words)
    return rows


def test_help_lists_every_command_with_a_line_of_help():
    result = sora("--help")
    assert result.returncode == 0, result.stderr
    commands = help_rows(result.stdout, "Commands")
    assert set(commands) == set(COMMANDS) | set(GROUPS), result.stdout
    for command, (_, words) in commands.items():
        assert len(" ".join(words)) > 20, f"{command} has no help text"
    assert set(help_rows(result.stdout, "Options")) == {"--help"}


@pytest.mark.parametrize("command", COMMANDS)
def test_each_commands_help_lists_its_arguments_and_flags(command: str):
    result = sora(command, "--help")
    assert result.returncode == 0, result.stderr
    arguments, options = help_rows(result.stdout, "Arguments"), help_rows(result.stdout, "Options")
    expected_arguments, expected_options = HELP[command]
    assert list(arguments) == expected_arguments, result.stdout
    assert all(required for required, _ in arguments.values())
    missing = [flag for flag in [*expected_options, "--help"] if flag not in options]
    assert not missing, f"sora {command} --help does not list {missing}:\n{result.stdout}"
    for flag in expected_options:
        required, words = options[flag]
        assert len(words) >= 2, f"{flag} has no help text"  # its type, then its help
        assert required == (flag in REQUIRED.get(command, [])), flag


def test_cache_group_lists_verify_and_verify_takes_the_cache_folder():
    result = sora("cache", "--help")
    assert result.returncode == 0, result.stderr
    assert list(help_rows(result.stdout, "Commands")) == GROUPS["cache"]
    verify = sora("cache", "verify", "--help")
    assert verify.returncode == 0, verify.stderr
    assert list(help_rows(verify.stdout, "Arguments")) == ["DIR"]
    assert "exit code 0 when it is intact, 1 when a problem was found" in " ".join(verify.stdout.split()).lower()


def test_a_malformed_mask_strategy_flag_is_one_line_naming_the_tuple():
    result = sora("sample", "configs/debug/inference.py", "--mask-strategy", "0,0,0,1;0,0,0,1,0", "--prompt", "a")
    assert result.returncode == 2
    assert result.stderr.strip() == (
        'error: command line: mask_strategy[0]: tuple 0 "0,0,0,1": 4 numbers; expected 5 or 6: '
        "ref_index,loop_index,ref_start_frame,num_frames,target_location[,edit_ratio] (Open-Sora 1.1 files use "
        'the order loop,ref,ref_start,target_start,length; if this is one, write it as "0,0,0,1,1")'
    )


def test_config_prints_the_resolved_config():
    result = sora("config", "configs/debug/train.py")
    assert result.returncode == 0, result.stderr
    assert "bucket_config = {" in result.stdout and "model = dict(" in result.stdout


def test_bad_config_is_one_line_naming_file_and_key(tmp_path: Path):
    path = tmp_path / "bad.py"
    path.write_text('data_path = "x.csv"\nepoch = 3\n')
    result = sora("config", str(path), "--kind", "train")
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {path}: unknown key 'epoch' (did you mean 'epochs'?)"
    assert "Traceback" not in result.stderr


def test_overrides_are_validated_before_anything_runs():
    result = sora("sample", "configs/debug/inference.py", "--num-frames", "0")
    assert result.returncode == 2
    assert "command line: num_frames: must be >= 1, got 0" in result.stderr


def test_opensora_file_notices_go_to_stderr():
    result = sora("config", "tests/fixtures/opensora/v1_1_train_stage1.py")
    assert result.returncode == 0, result.stderr
    assert "notice:" in result.stderr and "num_bucket_build_workers" in result.stderr
    assert "notice" not in result.stdout


def test_demo_data_and_debug_models_write_files(tmp_path: Path):
    result = sora("demo-data", str(tmp_path / "data"), "--num", "3", "--seed", "5")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "data" / "data.csv").exists()
    assert len((tmp_path / "data" / "data.csv").read_text().splitlines()) == 1 + 3 + 3
    result = sora("debug-models", str(tmp_path / "models"))
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "models" / "vae" / "config.json").exists()
    assert (tmp_path / "models" / "t5" / "tokenizer_config.json").exists()


def test_bucket_report_of_the_demo_csv_explains_every_row(tmp_path: Path, demo_csv: Path):
    plot = tmp_path / "report.png"
    result = sora("bucket-report", str(demo_csv), "--config", "configs/debug/train.py", "--plot", str(plot))
    assert result.returncode == 0, result.stderr
    assert "rows in: 15   kept: 12   dropped: 3" in result.stdout
    assert "could not be probed: file not found" in result.stdout
    assert plot.stat().st_size > 10_000 and plot.read_bytes()[:4] == b"\x89PNG"


def test_bucket_report_json_uses_metadata_columns_without_probing(tmp_path: Path):
    table = tmp_path / "meta.csv"
    rows = ["path,text,num_frames,height,width,fps"]
    rows += [f"missing_{i}.mp4,clip {i},40,{240 + i},426,24" for i in range(6)]  # files need not exist
    rows += ["still.png,an image,1,144,256,0", "tiny.mp4,too small,40,16,16,24"]
    table.write_text("\n".join(rows) + "\n")
    result = sora("bucket-report", str(table), "--config", "configs/debug/train.py", "--json")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    assert report["rows_in"] == 8 and report["kept"] + report["dropped"] == 8
    assert sum(bucket["samples"] for bucket in report["buckets"]) == report["kept"]
    assert [drop["examples"] for drop in report["drops"]] == [["tiny.mp4"]]
    # 240p with T=16 is (0.0, None) in the debug config: those 40-frame clips go down to 144p.
    assert {bucket["name"] for bucket in report["buckets"] if bucket["num_frames"] == 16} == {"144p-16f-0.56"}


def test_bucket_report_names_a_missing_column(tmp_path: Path):
    table = tmp_path / "bad.csv"
    table.write_text("file,caption\na.mp4,x\n")
    result = sora("bucket-report", str(table), "--config", "configs/debug/train.py")
    assert result.returncode == 2
    assert "missing required column 'path', 'text'" in result.stderr


def test_output_path_that_is_a_file_is_one_line(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    for command in ("demo-data", "debug-models"):
        result = sora(command, str(blocker))
        assert result.returncode == 2, (command, result.stderr)
        assert "Traceback" not in result.stderr and result.stderr.startswith("error:")


def test_train_without_a_cache_says_what_to_run(tmp_path: Path):
    result = sora("train", "configs/debug/train.py", "--data-path", str(tmp_path / "no-cache"))
    assert result.returncode == 2
    assert (
        result.stderr.strip() == f"error: {tmp_path / 'no-cache'} is not a finished cache (no manifest.json); "
        "run `sora preprocess` to create or finish it"
    )
