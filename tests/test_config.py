"""Config files: every shipped file, Open-Sora's own files, bad input, overrides."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from bucketing.config import fixed_bucket_config, parse_bucket_config
from pipelines.config import (
    ConfigError,
    InferenceConfig,
    TrainConfig,
    detect_kind,
    format_config,
    load_config,
    read_config_file,
)

ROOT = Path(__file__).resolve().parent.parent
CONFIG_FILES = sorted((ROOT / "configs").rglob("*.py"))
OPENSORA_FILES = sorted((ROOT / "tests" / "fixtures" / "opensora").glob("*.py"))


def expected_kind(path: Path) -> str:
    return "inference" if "inference" in path.as_posix() else "train"


def write(tmp_path: Path, text: str, name: str = "config.py") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


TRAIN_MINIMAL = 'data_path = "data.csv"\nnum_frames = 16\nimage_size = (256, 256)\nbatch_size = 2\n'
INFERENCE_MINIMAL = 'prompt = ["a red circle"]\nsave_dir = "out"\n'


# --------------------------------------------------------------------------- shipped files


def test_configs_folder_has_the_promised_recipes():
    names = {path.relative_to(ROOT / "configs").as_posix() for path in CONFIG_FILES}
    assert {"debug/train.py", "debug/inference.py"} <= names
    for size in ("16x256x256", "16x512x512", "64x512x512"):
        assert f"opensora/train/{size}.py" in names
        assert f"opensora/inference/{size}.py" in names
    assert any(name.startswith("opensora-v1-1/train/") for name in names)


@pytest.mark.parametrize("path", CONFIG_FILES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_config_file_loads_and_round_trips(path: Path, tmp_path: Path):
    notices: list[str] = []
    config = load_config(path, notice=notices.append)
    kind = expected_kind(path)
    assert isinstance(config, TrainConfig if kind == "train" else InferenceConfig)
    assert notices == [], "our own files use no ignored Open-Sora keys"
    # The resolved form is itself a valid config file that loads back equal.
    resolved = write(tmp_path, format_config(config))
    assert load_config(resolved, kind) == config


def test_recipes_use_the_real_model_names():
    config = load_config(ROOT / "configs/opensora/train/16x256x256.py")
    assert config.model.type == "STDiT-XL/2"
    assert config.vae.from_pretrained == "stabilityai/sd-vae-ft-ema"
    assert config.text_encoder.from_pretrained == "DeepFloyd/t5-v1_1-xxl"
    assert (config.num_frames, config.image_size, config.bucket_config) == (16, (256, 256), None)
    mixed = load_config(ROOT / "configs/opensora-v1-1/train/mixed.py")
    # The seed documents' opening bucket_config, values kept as tuples.
    assert mixed.bucket_config["480p"] == {1: (1.0, 52), 16: (0.5, 4), 32: (0.0, None)}
    assert mixed.bucket_config["240p"][128] == (1.0, 2)


def test_open_sora_1_2_rflow_scheduler_reads(tmp_path: Path):
    text = 'scheduler = dict(type="rflow", use_timestep_transform=True, sample_method="logit-normal")\n'
    scheduler = load_config(write(tmp_path, TRAIN_MINIMAL + text), "train").scheduler
    assert scheduler.rflow_options == {
        "sample_method": "logit-normal", "loc": 0.0, "scale": 1.0, "use_timestep_transform": True,
        "transform_scale": 1.0,
    }  # fmt: skip
    assert load_config(write(tmp_path, TRAIN_MINIMAL), "train").scheduler.rflow_options == {}  # iddpm


def test_seed_arithmetic_is_evaluated():
    config = load_config(ROOT / "configs/opensora/inference/64x512x512.py")
    assert config.fps == 12  # 24 // 2
    assert config.model.time_scale == pytest.approx(2 / 3)


# --------------------------------------------------------------------------- Open-Sora's files


# Open-Sora 1.1's sample-ref.py writes mask_strategy in 1.1's own tuple order, not the seed's.
OPENSORA_1_1_ORDER = "v1_1_inference_sample_ref.py"


@pytest.mark.parametrize("path", [p for p in OPENSORA_FILES if p.name != OPENSORA_1_1_ORDER], ids=lambda p: p.name)
def test_opensora_files_load_unchanged(path: Path):
    config = load_config(path, notice=lambda message: None)
    assert isinstance(config, TrainConfig if expected_kind(path) == "train" else InferenceConfig)


def test_opensora_1_1_dataset_section_maps_to_fields():
    notices: list[str] = []
    config = load_config(OPENSORA_FILES[0].parent / "v1_1_train_stage1.py", notice=notices.append)
    assert config.frame_interval == 3
    assert config.num_frames is None and config.image_size is None
    assert config.bucket_config["144p"][96] == (1.0, 1)
    assert config.vae.local_files_only and config.text_encoder.local_files_only
    assert config.mask_ratios["mask_no"] == 0.75
    # Exactly one notice per ignored key, naming it, plus the dataset-section notice.
    for key in ("num_bucket_build_workers", "num_workers"):
        assert any(f"'{key}'" in notice and "ignoring" in notice for notice in notices)
    assert any("dataset" in notice for notice in notices)
    assert len(notices) == 3


def test_opensora_1_1_inference_keys():
    notices: list[str] = []
    folder = OPENSORA_FILES[0].parent
    config = load_config(folder / "v1_1_inference_sample.py", notice=notices.append)
    assert config.save_fps == 8  # fps 24 // frame_interval 3, as Open-Sora 1.1 saves
    assert [n for n in notices if "multi_resolution" in n]


def test_opensora_1_1_mask_strategy_order_is_refused_with_the_seed_spelling(tmp_path: Path):
    """1.1 writes loop,ref,ref_start,target_start,length; the seed (and this project) ref,loop,ref_start,length,target.

    Read silently, "0,0,0,0,8,0.3" would insert 0 frames at frame 8; the error says how to write it instead.
    """
    original = OPENSORA_FILES[0].parent / OPENSORA_1_1_ORDER
    with pytest.raises(ConfigError) as caught:
        load_config(original, notice=lambda m: None)
    message = str(caught.value)
    assert message.startswith(f'{original}: mask_strategy[0]: tuple 0 "0,0,0,0,8,0.3": num_frames must be 1 or more')
    assert 'write it as "0,0,0,8,0,0.3"' in message
    # Rewritten as the errors say (the "0" of the third prompt is 1.1's short form of "0,0,0,1,0"),
    # the file loads, and the long-video fields read as the seed defines them.
    fixed = original.read_text().replace('"0,0,0,0,8,0.3"', '"0,0,0,8,0,0.3"').replace('    "0",', '    "0,0,0,1,0",')
    long = load_config(write(tmp_path, fixed, "sample_ref.py"), "inference", notice=lambda m: None)
    assert long.loop == 2 and long.long_video.total_frames == 2 * (16 - 4) + 4
    assert long.reference_path[1] is None and long.mask_strategy == ("0,0,0,8,0,0.3", None, "0,0,0,1,0")


def test_v1_0_dataloader_keys_are_ignored_with_a_reason():
    notices: list[str] = []
    load_config(OPENSORA_FILES[0].parent / "v1_0_train_16x256x256.py", notice=notices.append)
    assert [notice.split("'")[1] for notice in notices] == ["use_image_transform", "num_workers"]
    assert "pre-encoded cache" in notices[1]


def test_v1_0_inference_fps_is_the_saved_rate():
    config = load_config(OPENSORA_FILES[0].parent / "v1_0_inference_64x512x512.py")
    assert config.save_fps == 12
    assert config.scheduler.cfg_channel == 3  # our default when the file does not say


def test_later_spelling_of_flash_attention_is_read(tmp_path: Path):
    notices: list[str] = []
    path = write(tmp_path, TRAIN_MINIMAL + 'model = dict(type="STDiT2-XL/2", enable_flash_attn=True)\n')
    config = load_config(path, notice=notices.append)
    assert config.model.enable_flashattn is True
    assert notices and "enable_flashattn" in notices[0]


def test_dataset_section_conflicting_with_top_level_is_an_error(tmp_path: Path):
    path = write(tmp_path, TRAIN_MINIMAL + "frame_interval = 2\ndataset = dict(frame_interval=3)\n")
    with pytest.raises(ConfigError, match=r"dataset.frame_interval=3 disagrees with frame_interval=2"):
        load_config(path, notice=lambda m: None)


def test_unknown_dataset_type_lists_valid_ones(tmp_path: Path):
    path = write(tmp_path, TRAIN_MINIMAL + 'dataset = dict(type="ImageNet")\n')
    with pytest.raises(ConfigError, match="VariableVideoTextDataset"):
        load_config(path, notice=lambda m: None)


# --------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("epoch = 3\n", r"unknown key 'epoch' \(did you mean 'epochs'\?\)"),
        (
            "model = dict(space_scal=1.0)\n",
            r"unknown key 'model.space_scal' \(did you mean 'model.space_scale'\?\)",
        ),
        ("zzz_qqq = 1\n", r"unknown key 'zzz_qqq'; valid keys here: .*batch_size"),
        ('lr = "fast"\n', r"lr: expected a number, got 'fast' \(str\)"),
        ("grad_checkpoint = 1\n", r"grad_checkpoint: expected True/False, got 1"),
        ('dtype = "fp8"\n', r"dtype: 'fp8' is not one of 'fp32', 'fp16', 'bf16'"),
        ('plugin = "zero3"\n', r"plugin: 'zero3' is not one of 'zero2', 'zero2-seq'"),
        ("epochs = 0\n", r"epochs: must be >= 1, got 0"),
        ("ema_decay = 1.5\n", r"ema_decay: must be <= 1.0, got 1.5"),
        ("image_size = (256,)\n", r"image_size: expected a tuple \(an integer, an integer\)"),
        ("image_size = (0, 256)\n", r"image_size: height and width must be positive"),
        (
            'model = dict(type="STDiT-XXL/2")\n',
            r"model.type: 'STDiT-XXL/2' is not one of .*did you mean 'STDiT-XL/2'",
        ),
        ("model = 3\n", r"model: expected dict\(...\), got 3"),
        ("vae = dict(micro_batch_size=0)\n", r"vae.micro_batch_size: must be >= 1, got 0"),
        ('text_encoder = dict(type="clip")\n', r"text_encoder.type: 'clip' is not one of 't5'"),
        ("sp_size = 2\n", r"sp_size=2 needs plugin='zero2-seq'"),
        ("mask_ratios = {'mask_none': 1.0}\n", r"mask_ratios: 'mask_none' is not one of .*mask_no"),
        ("mask_ratios = {'mask_no': 0.5}\n", r"mask_ratios: the ratios must add up to 1, they add up to 0.5"),
        ("bucket_config = {'240p': {16: 1.0}}\n", r"bucket_config\['240p'\]\[16\]: expected a tuple"),
        ("num_frames = None\n", r"num_frames must be set when there is no bucket_config"),
        ("batch_size = None\n", r"batch_size must be set when there is no bucket_config"),
        ('scheduler = dict(type="dpm-solver")\n', r"scheduler: type 'dpm-solver' only samples"),
        ('scheduler = dict(type="rflow", sample_method="beta")\n', r"scheduler.sample_method: 'beta' is not one of"),
    ],
)
def test_bad_training_values_name_file_and_field(tmp_path: Path, text: str, pattern: str):
    path = write(tmp_path, TRAIN_MINIMAL + text)
    with pytest.raises(ConfigError, match=pattern) as caught:
        load_config(path, "train")
    assert str(path) in str(caught.value)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        (
            "loop = 3\ncondition_frame_length = 16\nnum_frames = 16\n",
            r"condition_frame_length must be between 1 and",
        ),
        ("loop = 0\n", r"loop: must be >= 1"),
        ("scheduler = dict(cfg_channel=0)\n", r"scheduler.cfg_channel: must be >= 1"),
        ("scheduler = dict(type='ddim')\n", r"scheduler.type: 'ddim' is not one of 'iddpm', 'iddpm-speed', 'dpm-"),
        ("mask_strategy = [1]\n", r"mask_strategy\[0\]: expected a string, got 1 \(int\)"),
    ],
)
def test_bad_inference_values(tmp_path: Path, text: str, pattern: str):
    path = write(tmp_path, INFERENCE_MINIMAL + text)
    with pytest.raises(ConfigError, match=pattern):
        load_config(path, "inference")


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("import os\n", r":1: config files hold only assignments"),
        ("x = 1\ny = open('f')\n", r":2: only literals, arithmetic, earlier names and dict"),
        ("a, b = 1, 2\n", r"config files hold only assignments"),
        ("x = undefined + 1\n", r"name `undefined` is not defined above"),
        ("_base_ = ['other.py']\n", r"`_base_` inheritance is not supported"),
        ("x = (\n", r"not valid Python"),
        ("x = 1 / 0\n", r"cannot evaluate `1 / 0`"),
        ("x = dict(**other)\n", r"only literals"),
    ],
)
def test_only_literal_files_are_read(tmp_path: Path, text: str, pattern: str):
    with pytest.raises(ConfigError, match=pattern):
        read_config_file(write(tmp_path, text))


def test_names_assigned_earlier_and_private_helpers(tmp_path: Path):
    raw = read_config_file(write(tmp_path, "_fps = 24\nframe_interval = 3\nfps = _fps // frame_interval\n"))
    assert raw == {"frame_interval": 3, "fps": 8}


def test_missing_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"config file not found: .*nope\.py"):
        load_config(tmp_path / "nope.py", "train")


def test_kind_is_guessed_or_asked_for(tmp_path: Path):
    assert detect_kind({"epochs": 1}) == "train"
    assert detect_kind({"save_dir": "x"}) == "inference"
    with pytest.raises(ConfigError, match="say which with --kind"):
        load_config(write(tmp_path, "seed = 1\n"))
    assert isinstance(load_config(write(tmp_path, "seed = 1\n"), "inference"), InferenceConfig)


# --------------------------------------------------------------------------- overrides


def test_overrides_set_fields_by_dotted_path():
    path = ROOT / "configs/debug/inference.py"
    config = load_config(
        path,
        overrides={
            "prompt_path": "prompts.txt",
            "model.from_pretrained": "outputs/exp/checkpoint",
            "scheduler.num_sampling_steps": 3,
            "image_size": (64, 96),
            "seed": None,  # not given on the command line: the file's value stays
        },
    )
    assert config.prompt_path == "prompts.txt"
    assert config.model.from_pretrained == "outputs/exp/checkpoint"
    assert config.model.type == "debug"  # the rest of the section is kept
    assert config.scheduler.num_sampling_steps == 3
    assert config.scheduler.cfg_scale == 4.0
    assert config.image_size == (64, 96)
    assert config.seed == 42


def test_override_creates_a_missing_section(tmp_path: Path):
    config = load_config(write(tmp_path, TRAIN_MINIMAL), overrides={"model.from_pretrained": "w.pth"})
    assert config.model.from_pretrained == "w.pth"


def test_bad_override_value_blames_the_command_line():
    with pytest.raises(ConfigError, match=r"^command line: num_frames: must be >= 1, got 0"):
        load_config(ROOT / "configs/debug/inference.py", overrides={"num_frames": 0})


def test_unknown_override_path_is_an_error():
    with pytest.raises(ConfigError, match=r"unknown key 'model.from_pretraind'"):
        load_config(ROOT / "configs/debug/inference.py", overrides={"model.from_pretraind": "x"})


def test_buckets_are_parsed_once_into_the_config(tmp_path: Path):
    mixed = load_config(ROOT / "configs/opensora-v1-1/train/mixed.py")
    assert mixed.buckets == parse_bucket_config(mixed.bucket_config, mixed.frame_interval)
    fixed = load_config(ROOT / "configs/opensora/train/16x256x256.py")
    assert fixed.buckets == fixed_bucket_config((256, 256), 16, 8, 3)  # image_size, num_frames, batch_size, interval
    # Configs are shipped to Ray workers: the parsed buckets travel with them.
    for config in (mixed, fixed):
        shipped = pickle.loads(pickle.dumps(config))
        assert shipped == config and shipped.buckets == config.buckets


def test_buckets_are_derived_not_a_setting(tmp_path: Path):
    config = load_config(write(tmp_path, TRAIN_MINIMAL))
    assert "buckets" not in format_config(config) and "buckets" not in repr(config)
    with pytest.raises(ConfigError, match=r"unknown key 'buckets' \(did you mean 'bucket_config'\?\)"):
        load_config(write(tmp_path, TRAIN_MINIMAL + "buckets = None\n"))
    with pytest.raises(ConfigError, match=r"unknown key 'buckets'"):
        load_config(write(tmp_path, TRAIN_MINIMAL), overrides={"buckets": "x"})


def test_configs_are_frozen():
    config = load_config(ROOT / "configs/debug/train.py")
    with pytest.raises(AttributeError):
        config.lr = 1.0  # type: ignore[misc]


def test_later_mask_names_are_read_as_the_1_1_names(tmp_path: Path):
    names = ("identity", "quarter_random", "image_head_tail")
    path = write(
        tmp_path, TRAIN_MINIMAL + f"mask_ratios = {{'{names[0]}': 0.8, '{names[1]}': 0.1, '{names[2]}': 0.1}}\n"
    )
    config = load_config(path)
    assert config.mask_ratios == {"mask_no": 0.8, "mask_quarter_random": 0.1, "mask_image_head_tail": 0.1}


def test_open_sora_1_0_mask_names_are_the_quarter_masks(tmp_path: Path):
    """configs/opensora/train/16x256x256-mask.py (Open-Sora v1.1.0 still ships it) is the 1.0
    training config plus mask_ratios with the names from before the rename: mask_random / head /
    tail / head_tail are the quarter masks (a block of randint(1, T // 4) frames at a random
    place, at the head, the tail, at both ends)."""
    base = (OPENSORA_FILES[0].parent / "v1_0_train_16x256x256.py").read_text()
    masks = 'mask_ratios = {"mask_no": 0.7, "mask_random": 0.15, "mask_head": 0.05, "mask_tail": 0.05, '
    masks += '"mask_head_tail": 0.05}\n'
    config = load_config(write(tmp_path, base + masks), notice=lambda message: None)
    assert config.mask_ratios == {
        "mask_no": 0.7,
        "mask_quarter_random": 0.15,
        "mask_quarter_head": 0.05,
        "mask_quarter_tail": 0.05,
        "mask_quarter_head_tail": 0.05,
    }


def test_file_errors_are_not_blamed_on_a_similar_override(tmp_path: Path):
    path = write(tmp_path, 'save_dir = "x"\nprompt_path = 3\n')
    with pytest.raises(ConfigError, match=rf"^{path}: prompt_path: expected a string"):
        load_config(path, "inference", overrides={"prompt": ["hi"]})


def test_wrong_kind_of_config_says_so():
    with pytest.raises(ConfigError, match=r"inference.py looks like an inference config, not train config"):
        load_config(ROOT / "configs/debug/inference.py", "train")
    with pytest.raises(ConfigError, match=r"train.py looks like a training config, not inference config"):
        load_config(ROOT / "configs/debug/train.py", "inference")


def test_dataset_section_list_equals_top_level_tuple(tmp_path: Path):
    path = write(tmp_path, TRAIN_MINIMAL + "dataset = dict(type='VideoTextDataset', image_size=[256, 256])\n")
    assert load_config(path, notice=lambda m: None).image_size == (256, 256)


@pytest.mark.parametrize(
    ("text", "pattern"),
    [
        ("prompt = []\n", r"prompt: an empty list"),
        ("reference_path = ['a.png', None]\n", r"reference_path: 2 entries for 1 prompts"),
        ("mask_strategy = []\n", r"mask_strategy: 0 entries for 1 prompts"),
    ],
)
def test_per_prompt_lists_match_the_prompts(tmp_path: Path, text: str, pattern: str):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, INFERENCE_MINIMAL + text), "inference")


def test_opensora_speedit_file_trains_with_iddpm_speed():
    """configs/opensora/train/16x256x256-spee.py: scheduler type 'iddpm-speed' and 1.0's mask names."""
    from pipelines.trainer import training_diffusion
    from sora_model.diffusion import IDDPMSpeed

    config = load_config(OPENSORA_FILES[0].parent / "v1_0_train_16x256x256_spee.py", notice=lambda m: None)
    assert config.scheduler.type == "iddpm-speed"
    assert isinstance(training_diffusion(config), IDDPMSpeed)
    assert config.mask_ratios["mask_no"] == 0.5


def test_opensora_batch_size_search_form_loads_and_training_refuses_it(tmp_path: Path):
    """opensora-v1-1/train/benchmark.py: (keep_prob, (min, max[, step])) of scripts/misc/search_bs.py,
    and keep_prob 20, which Open-Sora's `rng.random() < keep_prob` always keeps."""
    from bucketing.config import BatchSearch
    from pipelines.train import make_plan

    config = load_config(OPENSORA_FILES[0].parent / "v1_1_train_benchmark.py", notice=lambda m: None)
    assert config.bucket_config["720p"] == {1: (20.0, 40), 32: (0.5, (2, 4)), 64: (0.5, (1, 1))}
    (entry,) = config.buckets.resolutions
    assert [(b.num_frames, b.keep_prob, b.batch_size, b.search) for b in entry.frames] == [
        (64, 0.5, None, BatchSearch(1, 1, 2)),
        (32, 0.5, None, BatchSearch(2, 4, 2)),
        (1, 20.0, 40, None),
    ]
    assert config.buckets.searched() == ["bucket_config['720p'][64]: [1,1)", "bucket_config['720p'][32]: [2,4)"]
    assert entry.frames[0].search.candidates == () and entry.frames[1].search.candidates == (2,)  # max excluded
    refused = r"integer batch size per bucket.*\['720p'\]\[64\]: \[1,1\).*`sora search-batch-size CONFIG` finds"
    with pytest.raises(ConfigError, match=refused):
        make_plan(None, config, workers=1)  # refused before the cache is read
    # The resolved form loads back the same.
    again = load_config(write(tmp_path, format_config(config)), "train")
    assert again.bucket_config == config.bucket_config


def test_opensora_sequence_parallel_file_loads_as_zero2_seq():
    """opensora/train/64x512x512-sp.py asks for sequence parallelism with plugin 'zero2', sp_size=2 and
    model.enable_sequence_parallelism=True; it loads as plugin 'zero2-seq' with a notice."""
    notices: list[str] = []
    config = load_config(OPENSORA_FILES[0].parent / "v1_0_train_64x512x512_sp.py", notice=notices.append)
    assert (config.plugin, config.sp_size) == ("zero2-seq", 2)
    assert any("as plugin 'zero2-seq'" in notice for notice in notices)


def test_our_sequence_parallel_recipe_splits_over_pairs_of_workers():
    from pipelines.train import check_sequence_parallel

    config = load_config(ROOT / "configs/opensora/train/64x512x512-sp.py", "train")
    assert (config.plugin, config.sp_size, config.model.type) == ("zero2-seq", 2, "STDiT-XL/2")
    check_sequence_parallel(config, 4)  # 2 groups of 2
    with pytest.raises(ConfigError, match="got 3: use --num-workers 2"):
        check_sequence_parallel(config, 3)


def test_sp_size_without_the_models_switch_still_needs_zero2_seq(tmp_path: Path):
    with pytest.raises(ConfigError, match="sp_size=2 needs plugin='zero2-seq'"):
        load_config(write(tmp_path, TRAIN_MINIMAL + "sp_size = 2\n"), "train")
