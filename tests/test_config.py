"""Config: stages.yaml + --config + --set, validated with paths, lines, valid keys."""
from __future__ import annotations

import pytest

from clips4.pipeline.config import ConfigError, load_config
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_repo_stages_yaml_is_valid():
    cfg = load_config(REPO / "stages.yaml")
    assert cfg.params("segments").ucm_threshold == 0.25 and cfg.params("segments").max_segments == 48
    assert cfg.params("prototypes").top_m == 32 and cfg.params("prototypes").n_unknown == 64
    assert cfg.params("train").lr == 0.001 and cfg.params("train").n_segments == 36


def test_overrides_layer_in_order(tmp_path):
    extra = tmp_path / "my.yaml"
    extra.write_text("stages:\n  segments:\n    params:\n      ucm_threshold: 0.4\n")
    cfg = load_config(REPO / "stages.yaml", [extra], ["segments.max_segments=10"])
    assert cfg.params("segments").ucm_threshold == 0.4 and cfg.params("segments").max_segments == 10
    cfg = load_config(REPO / "stages.yaml", [extra], ["segments.ucm_threshold=0.3"])
    assert cfg.params("segments").ucm_threshold == 0.3


def _refused(tmp_path, text: str) -> tuple[Path, str]:
    """(the file, load_config's message) for a --config file holding ``text``, which must be refused."""
    bad = tmp_path / "bad.yaml"
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(REPO / "stages.yaml", [bad])
    return bad, str(e.value)


def test_typo_reports_path_line_and_valid_keys(tmp_path):
    bad, msg = _refused(tmp_path, "stages:\n  segments:\n    params:\n      ucm_treshold: 0.4\n")
    assert "stages.segments.params.ucm_treshold" in msg and f"{bad}:4" in msg
    assert "did you mean 'ucm_threshold'" in msg and "max_segments" in msg


def test_a_misspelt_choice_gets_the_closest_one():
    with pytest.raises(ConfigError, match=r"got 'vocc'; did you mean 'voc'\?"):
        load_config(REPO / "stages.yaml", None, ["dataset.kind=vocc"])
    with pytest.raises(ConfigError) as e:  # nothing close: no guess
        load_config(REPO / "stages.yaml", None, ["dataset.kind=zzzzzz"])
    assert "did you mean" not in str(e.value) and "'bsds'" in str(e.value)


def test_bad_values_list_allowed_choices():
    with pytest.raises(ConfigError, match="'ray' or 'local'"):
        load_config(REPO / "stages.yaml", None, ["ray.executor=spark"])
    with pytest.raises(ConfigError, match="less than or equal to 1"):
        load_config(REPO / "stages.yaml", None, ["segments.ucm_threshold=3"])
    with pytest.raises(ConfigError, match="unknown stage"):
        load_config(REPO / "stages.yaml", None, ["stages.segmnts.params.x=1"])
    with pytest.raises(ConfigError, match="PATH=VALUE"):
        load_config(REPO / "stages.yaml", None, ["segments.ucm_threshold"])


def test_yaml_is_parsed_safely(tmp_path):
    evil = tmp_path / "evil.yaml"
    evil.write_text("cache_root: !!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(None, [evil], search=False)


def test_cli_usage_errors_exit_2_without_traceback(capsys):
    from clips4.cli import main

    assert main(["train", "--bogus"]) == 2
    assert main(["precompute", "segments", "--set", "segments.ucm_treshold=0.3", "--root", "."]) == 2
    err = " ".join(capsys.readouterr().err.split())  # rich wraps long lines
    assert "No such option" in err and "did you mean 'ucm_threshold'" in err and "Traceback" not in err


def test_evaluate_is_not_a_top_level_package(tmp_path):
    import subprocess
    import sys

    code = "import importlib.util, clips4.evaluate; print(importlib.util.find_spec('evaluate') is None)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


def test_stages_yaml_params_are_the_models_defaults():
    """One default per parameter: every value stages.yaml lists equals its params model's default."""
    import yaml

    from clips4.pipeline.config import stage_object

    doc = yaml.safe_load((REPO / "stages.yaml").read_text())
    for name, decl in doc["stages"].items():
        model = stage_object(decl["run"]).Params
        defaults = model().model_dump(mode="json")

        def check(listed, default, path):
            if isinstance(listed, dict) and isinstance(default, dict) and listed:
                for k, v in listed.items():
                    assert k in default, f"{path}.{k} is not a param"
                    check(v, default[k], f"{path}.{k}")
            else:
                assert listed == default, f"{path}: stages.yaml says {listed!r}, the model's default is {default!r}"

        check(decl.get("params") or {}, defaults, f"stages.{name}.params")


def test_choice_fields_match_their_registries():
    import typing

    from clips4.pipeline.clip.dense_heads import DENSE_VARIANTS
    from clips4.pipeline.config import ClipParams, SegmentsParams
    from clips4.pipeline.contours import CONTOUR_DETECTORS
    from clips4.trainer.config import TrainParams
    from clips4.trainer.model import BACKBONES

    def choices(model, field):
        return set(typing.get_args(model.model_fields[field].annotation))

    assert choices(SegmentsParams, "detector") == set(CONTOUR_DETECTORS)
    assert choices(ClipParams, "variant") == set(DENSE_VARIANTS)
    assert choices(TrainParams, "backbone") == set(BACKBONES)


def test_classes_dataset_follows_root(tmp_path):
    cfg = load_config(REPO / "stages.yaml", None, ["dataset.root=/data/w1", "prototypes.classes=dataset"])
    assert cfg.params("prototypes").classes == "/data/w1/classes.txt"
    cfg = load_config(REPO / "stages.yaml", None, ["dataset.root=/data/w2", "prototypes.classes=dataset/lists/c.txt"])
    assert cfg.params("prototypes").classes == "/data/w2/lists/c.txt"
    assert load_config(REPO / "stages.yaml", None, ["prototypes.classes=voc"]).params("prototypes").classes == "voc"
    with pytest.raises(ConfigError, match="needs a dataset root"):
        load_config(REPO / "stages.yaml", None, ["prototypes.classes=dataset"])


def test_loss_config_derives_from_train_params():
    from clips4.trainer.config import TrainParams
    from clips4.trainer.losses import LossConfig

    assert LossConfig().kappa == TrainParams().kappa
    assert LossConfig().semantic_temperature == TrainParams().semantic_temperature
    cfg = load_config(REPO / "stages.yaml", None, ["train.kappa=7", "train.semantic_temperature=1", "train.w_e=0",
                                                    "train.augment.gray_p=0", "train.augment.photometric=teacher"])
    p = cfg.params("train")
    lc = LossConfig.from_params(p)
    assert (lc.kappa, lc.semantic_temperature, lc.w_e) == (7, 1, 0)
    assert p.augment.gray_p == 0 and p.augment.photometric == "teacher"
    with pytest.raises(ConfigError, match="photometric"):
        load_config(REPO / "stages.yaml", None, ["train.augment.photometric=maybe"])


def test_every_training_parameter_is_declared_once_with_one_default():
    """The photometric fields are declared in PhotometricConfig only; AugmentParams adds the geometry and the
    modes; AugmentConfig and LossConfig are built from the params models, so their defaults are those."""
    import ast
    import dataclasses
    import inspect

    from clips4.pipeline.photometric import PhotometricConfig
    from clips4.trainer import augment, config, losses
    from clips4.trainer.config import AugmentParams, TrainParams

    photo = set(PhotometricConfig.model_fields)
    assert {"jitter", "jitter_p", "gray_p", "blur_p", "blur_sigma", "channel_shuffle_p", "invert_p"} <= photo
    assert issubclass(AugmentParams, PhotometricConfig) and not photo & set(AugmentParams.__annotations__)
    aug = {f.name: f.default for f in dataclasses.fields(augment.AugmentConfig)}
    assert aug == {"size": 321, "stride": 8, **{k: v.default for k, v in AugmentParams.model_fields.items()}}
    assert (aug["channel_shuffle_p"], aug["invert_p"]) == (AugmentParams().channel_shuffle_p, AugmentParams().invert_p)
    loss = {f.name: f.default for f in dataclasses.fields(losses.LossConfig)}
    for name in losses.TRAIN_FIELDS:
        assert loss[name] == TrainParams.model_fields[name].default, name
    assert set(loss) == set(losses.TRAIN_FIELDS) | {c[0] for c in losses.LOSS_CONSTANTS}
    # no module spells one of these fields as an annotated class attribute of its own
    for mod in (augment, losses, config):
        for node in ast.walk(ast.parse(inspect.getsource(mod))):
            if isinstance(node, ast.ClassDef) and node.name not in ("AugmentParams", "TrainParams"):
                own = {s.target.id for s in node.body if isinstance(s, ast.AnnAssign) and isinstance(s.target, ast.Name)}
                assert not own & (photo | set(losses.TRAIN_FIELDS)), (mod.__name__, node.name, own)
    # a training run's views use the params' values: what runs today
    p = TrainParams()
    built = augment.AugmentConfig(size=p.crop_size, **p.augment.model_dump())
    assert built.photometric_config == PhotometricConfig(**{k: getattr(p.augment, k) for k in photo})


def test_the_papers_configuration_is_a_bundled_layer(tmp_path, monkeypatch):
    """``--config paper`` (a bundled layer; a file of that name wins) gives the published method: hard argmax
    pseudo-labels, Eq. 3 without a temperature, no class calibration, the imposed SimCLR views with area crops,
    uniform unknown prototypes — every one of them a value clips4's defaults changed."""
    default = load_config(REPO / "stages.yaml")
    paper = load_config(REPO / "stages.yaml", ["paper"])
    t, d = paper.params("train"), default.params("train")
    assert (t.pseudo_labels, t.semantic_temperature, t.calibration) == ("hard", 1.0, "none")
    assert (t.augment.photometric, t.augment.geometric, t.augment.zoom, tuple(t.augment.scale)) == \
        ("imposed", "imposed", None, (0.25, 1.0))
    assert t.augment.regions == "none"  # whole-view transforms only
    assert (t.input, d.input) == ("rgb", "auto")  # the network sees the image
    assert paper.params("prototypes").unknown_pool == 1.0
    assert (d.pseudo_labels, d.semantic_temperature, d.calibration, d.augment.photometric) != \
        (t.pseudo_labels, t.semantic_temperature, t.calibration, t.augment.photometric)
    assert default.params("prototypes").unknown_pool != 1.0
    monkeypatch.chdir(tmp_path)
    (tmp_path / "paper").write_text("stages:\n  train:\n    params:\n      pseudo_labels: soft\n")
    assert load_config(REPO / "stages.yaml", ["paper"]).params("train").pseudo_labels == "soft"  # the file wins
    with pytest.raises(ConfigError, match="not a bundled config: paper, synthetic"):
        load_config(REPO / "stages.yaml", ["papr"])


def test_a_config_that_is_not_yaml_is_named_with_its_line_and_a_caret(tmp_path):
    """The fast (libyaml) parser's refusal is read again by the pure-Python one: the message quotes the line."""
    bad, msg = _refused(tmp_path, "stages:\n  segments:\n    params: {ucm_threshold: [0.1, 0.2}\n")
    assert str(bad) in msg and "line 3" in msg and "params: {ucm_threshold: [0.1, 0.2}" in msg and "^" in msg
