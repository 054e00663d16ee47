"""Behaviour of the model config, the backend registry, the fast backends' registration, the compile
mode switch, the CLI's core-count defaults, mixed precision and the engine's setting checks that
mutation testing found unpinned by the other tests: each test checks it against a stated fact or a
small computation of its own."""
import dataclasses
import math
import os

import pytest
import torch

from conftest import CLASSES, random_video, tiny_config
from vitaclip import VitaCLIP, VitaCLIPConfig, backends, compiling
from vitaclip.choices import default_num_workers, usable_cores
from vitaclip.engine.precision import autocast, grad_scaler
from vitaclip.engine.settings import check_count, check_number, is_path


# ---------------------------------------------------------------------------------------------- config

@pytest.mark.parametrize("fields, problem", [
    (dict(image_size=60), "image_size 60 is not a multiple of patch_size 8"),
    (dict(text_width=33), "text_width 33 is not divisible by text_heads 2"),
    (dict(num_frames=0), "num_frames must be >= 1"),
    (dict(layers=0), "layers and text_layers must be >= 1"),
    (dict(text_layers=0), "layers and text_layers must be >= 1"),
    (dict(num_global_prompts=-1), "num_global_prompts must be >= 0"),
    (dict(n_ctx=-1), "n_ctx must be >= 0"),
    (dict(ctx_init="   "), "ctx_init must not be empty"),
])
def test_configs_that_cannot_build_a_model_are_refused_by_name(fields, problem):
    """Each check alone: a patch grid that does not tile the image, a text head width that is no
    whole number, no frames, no layers in either tower (a config with one tower's layers only is
    as wrong), a negative prompt count and a context phrase of blanks only."""
    with pytest.raises(ValueError, match=f"VitaCLIPConfig: {problem}"):
        tiny_config(**fields)


def test_zero_global_prompts_and_an_empty_context_are_valid_counts():
    """0 is a count (the checks say >= 0): no global prompts, no learned context words."""
    assert tiny_config(num_global_prompts=0).num_global == 0
    assert tiny_config(n_ctx=0).n_ctx == 0


def test_switched_off_global_prompts_are_absent_whatever_their_count():
    """use_global=False means no global prompts: num_global is 0 and the vision tower holds none,
    though num_global_prompts keeps its (default) count."""
    config = tiny_config(use_global=False, num_global_prompts=2)
    assert config.num_global == 0
    assert not hasattr(VitaCLIP(config, CLASSES).visual, "global_prompts")
    assert tiny_config(num_global_prompts=2).num_global == 2


@pytest.mark.parametrize("prompts", [dict(use_local=False), dict(use_summary=False)])
def test_summary_or_local_prompts_alone_get_the_class_token_projection(prompts):
    """Both kinds of prompt are made from the class tokens through cls_proj: either alone needs it
    (a model with one of the two built no cls_proj and failed on its first video)."""
    config = tiny_config(**prompts)
    assert config.uses_cls_proj
    model = VitaCLIP(config, CLASSES).eval()
    assert all(hasattr(block, "cls_proj") for block in model.visual.blocks)
    with torch.no_grad():
        assert model(random_video(config, batch=1)).shape == (1, len(CLASSES))
    assert not tiny_config(use_summary=False, use_local=False).uses_cls_proj


def test_unknown_fields_are_refused_by_name_in_replace_and_from_dict():
    """A misspelt field is a ValueError naming it (a saved config's keys come from a file); not
    dataclasses' TypeError about an unexpected keyword."""
    config = tiny_config()
    with pytest.raises(ValueError, match=r"unknown config field\(s\): \['frames'\]"):
        config.replace(frames=4)
    with pytest.raises(ValueError, match=r"unknown config field\(s\): \['frames'\]"):
        VitaCLIPConfig.from_dict({**config.to_dict(), "frames": 4})
    assert config.replace(num_frames=4).num_frames == 4
    assert VitaCLIPConfig.from_dict(config.to_dict()) == config


# OpenAI CLIP's published architectures (Radford et al. 2021, Table 20): image size, patch, vision
# width/layers/heads, embedding dim, text width/layers/heads
CLIP_ARCHITECTURES = {
    "ViT-B/32": (224, 32, 768, 12, 12, 512, 512, 12, 8),
    "ViT-B/16": (224, 16, 768, 12, 12, 512, 512, 12, 8),
    "ViT-L/14": (224, 14, 1024, 24, 16, 768, 768, 12, 12),
    "ViT-L/14-336": (336, 14, 1024, 24, 16, 768, 768, 12, 12),
}


@pytest.mark.parametrize("name", sorted(CLIP_ARCHITECTURES))
def test_presets_are_the_published_clip_architectures(name):
    """Every size of every preset, the text tower's included (a wrong one fails only when the
    OpenAI weights are loaded into it)."""
    c = VitaCLIPConfig.preset(name)
    assert (c.image_size, c.patch_size, c.width, c.layers, c.heads, c.embed_dim, c.text_width, c.text_layers,
            c.text_heads) == CLIP_ARCHITECTURES[name]


def test_preset_names_in_other_spellings_and_overrides_of_preset_fields():
    """OpenAI names the 336-pixel model "ViT-L/14@336px": its "336px" spelling is the same preset; and
    an override of a field the preset sets wins over the preset's value."""
    assert VitaCLIPConfig.preset("vit-l-14-336px") == VitaCLIPConfig.preset("ViT-L/14-336")
    assert VitaCLIPConfig.preset("ViT-L/14-336PX").image_size == 336
    wide = VitaCLIPConfig.preset("ViT-B/16", patch_size=32, layers=6)
    assert (wide.patch_size, wide.layers, wide.grid_size) == (32, 6, 224 // 32)


# ---------------------------------------------------------------------------------------------- backends

@pytest.fixture
def fast_registered():
    """The fast backends' registry entries (they register when vitaclip.fast imports: needs Triton)."""
    if "fast" not in backends.available_backends():
        pytest.skip("the fast backends need Triton")
    return backends._BACKENDS


@pytest.fixture
def fast_everywhere(fast_registered, monkeypatch):
    """Every backend offered on every device (the fast ones are offered on CUDA only)."""
    for name, backend in list(fast_registered.items()):
        monkeypatch.setitem(fast_registered, name, dataclasses.replace(backend, is_available=lambda device: True))
    return fast_registered


def test_the_fast_backends_register_what_their_docstring_says(fast_registered):
    """vitaclip.fast: "fast" runs the layer eagerly; "fast-compiled" compiles it and the video embedding
    and text transformer too; "fast-graphed" is "fast-compiled" with whole passes captured as CUDA
    graphs; both compiled ones run as "fast" while a user's torch.compile traces the model."""
    flags = {name: (b.compile_modules, b.cuda_graphs, b.traced_as) for name, b in fast_registered.items()}
    assert flags["fast"] == (False, False, None)
    assert flags["fast-compiled"] == (True, False, "fast")
    assert flags["fast-graphed"] == (True, True, "fast")
    assert flags["reference"] == (False, False, None)


def test_auto_picks_the_highest_priority_backend_where_all_are_offered(fast_everywhere):
    """"auto" picks "fast-graphed" (vitaclip.fast: a "fast-compiled" step left the GPU idle half the
    time), then "fast-compiled", then "fast", over the reference: checked with the fast ones offered
    here too, as they are on CUDA."""
    cpu = torch.device("cpu")
    assert backends.resolve_backend("auto", cpu).name == "fast-graphed"
    del fast_everywhere["fast-graphed"]
    assert backends.resolve_backend("auto", cpu).name == "fast-compiled"
    del fast_everywhere["fast-compiled"]
    assert backends.resolve_backend("auto", cpu).name == "fast"


def test_a_compiled_backend_stands_in_for_fast_only_while_torch_compile_traces(fast_everywhere, monkeypatch):
    """Named outside a trace, a backend is itself; inside one (a user's torch.compile of the whole
    model), "fast-compiled" and "fast-graphed" resolve to their traced_as, "fast"."""
    cpu = torch.device("cpu")
    for name in ("fast-compiled", "fast-graphed", "fast", "reference"):
        assert backends.resolve_backend(name, cpu).name == name
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert [backends.resolve_backend(name, cpu).name for name in ("fast-compiled", "fast-graphed", "auto")] == \
        ["fast", "fast", "fast"]
    assert backends.resolve_backend("reference", cpu).name == "reference"


# ---------------------------------------------------------------------------------------------- switches

def test_a_switch_set_to_the_empty_string_is_refused_not_taken_as_unset(monkeypatch):
    """The default stands for an unset variable only: VITACLIP_COMPILE_MODE= (set, empty) is no mode,
    named as such, not silently the default."""
    monkeypatch.setenv(compiling.COMPILE_MODE_ENV, "")
    with pytest.raises(ValueError, match="VITACLIP_COMPILE_MODE=''"):
        compiling.compile_mode()
    monkeypatch.delenv(compiling.COMPILE_MODE_ENV)
    assert compiling.compile_mode() == "default"


# ---------------------------------------------------------------------------------------------- choices

def test_usable_cores_are_the_affinity_mask_not_the_machine(monkeypatch):
    """A job pinned to 3 of a 64-core machine's cores may use 3; its decoding workers are its share of
    them, less one for the process that feeds the GPU."""
    if not hasattr(os, "sched_getaffinity"):
        pytest.skip("no sched_getaffinity on this platform")
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {5, 9, 11})
    monkeypatch.setattr(os, "cpu_count", lambda: 64)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cores() == 3
    assert default_num_workers() == 3 - 1


def test_a_local_world_size_of_zero_counts_as_one_process(monkeypatch):
    """LOCAL_WORLD_SIZE=0 (no process at all, a launcher's bad value) is taken as one process, not a
    division by zero at `vitaclip --help`."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "0")
    assert default_num_workers() == 8 - 1


# ---------------------------------------------------------------------------------------------- precision

def test_autocast_computes_in_the_precision_named():
    """bf16 autocasts to bfloat16, fp16 to float16 (a matmul's result dtype under it), fp32 not at all."""
    cpu = torch.device("cpu")
    a = torch.randn(2, 2)
    for precision, dtype in (("bf16", torch.bfloat16), ("fp16", torch.float16), ("fp32", torch.float32)):
        with autocast(cpu, precision):
            assert (a @ a).dtype == dtype, precision


def test_only_fp16_gets_an_active_loss_scaler_and_unknown_precisions_are_refused():
    """bf16 has fp32's exponent range and fp32 is fp32: only fp16 needs its loss scaled. An unknown
    precision is refused by name here too, not given a disabled scaler."""
    cpu = torch.device("cpu")
    assert [grad_scaler(cpu, p).is_enabled() for p in ("bf16", "fp16", "fp32")] == [False, True, False]
    with pytest.raises(ValueError, match="precision must be one of"):
        grad_scaler(cpu, "fp8")


# ---------------------------------------------------------------------------------------------- settings

@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, True, False])
def test_a_number_setting_must_be_a_finite_real_and_no_bool(value):
    """NaN compares False with every bound, so it passed all of them; inf passes a lower bound; a bool
    is an int to Python, lr=True a rate of 1."""
    with pytest.raises(ValueError, match="x must be a finite number"):
        check_number("x", value, least=0)


def test_number_bounds_are_inclusive_least_and_exclusive_above_and_below():
    """least: >=, above: >, below: < (betas in [0, 1): beta 1 never forgets; lr > 0)."""
    check_number("x", 0.0, least=0)
    check_number("x", 0.5, least=0, below=1)
    for problem, kwargs in (("x must be >= 0", dict(value=-1e-9, least=0)),
                            ("x must be > 0", dict(value=0.0, above=0)),
                            ("x must be < 1", dict(value=1.0, below=1)),
                            ("x must be < 1", dict(value=1.5, least=0, below=1))):
        with pytest.raises(ValueError, match=problem):
            check_number("x", **kwargs)


def test_count_bounds_and_paths():
    """A count may equal its least; a bool is no count; an empty path is the current folder, no path."""
    check_count("n", 0, least=0)
    check_count("n", 1)
    for value, problem in ((0, "n must be >= 1"), (True, "n must be an integer"), (2.0, "n must be an integer")):
        with pytest.raises(ValueError, match=problem):
            check_count("n", value)
    assert is_path("runs/a") and is_path(os.path.join("a", "b"))
    assert not is_path("") and not is_path(None) and not is_path(3)


def test_the_default_stride_is_the_papers_kinetics_recipe():
    """16 frames between a clip's sampled frames, the paper's Kinetics-400 recipe (vitaclip.choices): the
    CLI's --stride default, and the stride eval, zeroshot and predict score a model at that records none."""
    from vitaclip.choices import DEFAULT_STRIDE

    assert DEFAULT_STRIDE == 16


def test_an_optional_backend_that_cannot_import_is_skipped_only_for_a_missing_module_or_triton(
        tmp_path, monkeypatch):
    """A machine without Triton (or without the optional module itself) still lists the reference; an
    optional backend broken otherwise is an error, not silently absent."""
    (tmp_path / "mutcfg_needs_triton.py").write_text("raise ImportError(\"No module named 'triton'\")\n")
    (tmp_path / "mutcfg_broken.py").write_text("raise ImportError(\"cannot import name 'x' from 'y'\")\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for modules in (("mutcfg_not_installed",), ("mutcfg_needs_triton",)):
        monkeypatch.setattr(backends, "OPTIONAL_BACKEND_MODULES", modules)
        monkeypatch.setattr(backends, "_optional_backends_loaded", False)
        assert "reference" in backends.available_backends(), modules
    monkeypatch.setattr(backends, "OPTIONAL_BACKEND_MODULES", ("mutcfg_broken",))
    monkeypatch.setattr(backends, "_optional_backends_loaded", False)
    with pytest.raises(ImportError, match="cannot import name 'x'"):
        backends.available_backends()
