"""Per-site bit widths of the scan (``site_bits``), their labels and their command-line form."""

from __future__ import annotations

import warnings

import pytest

import qmamba_ao
import qmamba_ao.models  # noqa: F401
from qmamba_ao.observers import LtSQObserver, TGQObserver
from qmamba_ao.recipes import bits_label, check_mapping_options, get_recipe, parse_site_bits
from qmamba_ao.ssm import SelectiveScan

warnings.filterwarnings("ignore", message="torch.ao.quantization is deprecated")


def _scans(model):
    return [m for m in model.modules() if hasattr(m, "site_modules")]


# -- validation ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, message",
    [
        ({"H": 8}, r"unknown scan site\(s\) 'H' \(did you mean 'h'\?\); the sites are dA, dBu, h, y"),
        ({"dBU": 8, "h": 8}, r"'dBU' \(did you mean 'dBu'\?\)"),
        ({"h": 9}, r"site_bits\['h'\]=9 \(int\): use an integer bit width in 2..8"),
        ({"h": 1}, r"site_bits\['h'\]=1 \(int\)"),
        ({"h": "8"}, r"site_bits\['h'\]='8' \(str\)"),
        ({"h": 8.0}, r"site_bits\['h'\]=8.0 \(float\)"),
        ({"h": True}, r"site_bits\['h'\]=True \(bool\)"),
        ("h=8", r"site_bits='h=8' \(str\): use a dict .*parse_site_bits"),
        ([("h", 8)], r"site_bits=\[\('h', 8\)\] \(list\): use a dict"),
    ],
)
def test_bad_site_bits_are_refused_with_what_to_do(value, message):
    with pytest.raises(ValueError, match=message):
        check_mapping_options(4, 4, {"site_bits": value})
    with pytest.raises(ValueError, match=message):
        qmamba_ao.get_qconfig_mapping("qmamba", 4, 4, site_bits=value)


def test_site_bits_are_normalised_to_site_order():
    opts = check_mapping_options(4, 4, {"site_bits": {"h": 8, "dA": 6}})
    assert list(opts["site_bits"].items()) == [("dA", 6), ("h", 8)]
    assert check_mapping_options(4, 4, {})["site_bits"] is None
    assert check_mapping_options(4, 4, {"site_bits": {}})["site_bits"] is None


@pytest.mark.parametrize("value", ["Log2", "paper", 1, None])
def test_bad_ltsq_form_is_refused(value):
    with pytest.raises(ValueError, match=r"ltsq_form=.*: use one of 'searched', 'log2'"):
        check_mapping_options(4, 4, {"ltsq_form": value})


def test_misspelt_option_names_suggest_the_new_ones():
    with pytest.raises(ValueError, match=r"'site_bit' \(did you mean 'site_bits'\?\)"):
        check_mapping_options(4, 4, {"site_bit": {"h": 8}})
    with pytest.raises(ValueError, match=r"'ltsq_from' \(did you mean 'ltsq_form'\?\)"):
        check_mapping_options(4, 4, {"ltsq_from": "log2"})


# -- the mapping -----------------------------------------------------------------------------------


def _site_ctors(recipe, **options):
    spec = qmamba_ao.get_qconfig_mapping(recipe, 4, 4, **options).object_type_qconfigs[SelectiveScan].activation
    return {s: ctor() for s, ctor in spec.sites.items() if ctor is not None}, spec.activation()


@pytest.mark.parametrize("recipe", ["qmamba", "minmax", "percentile", "quamba", "ptq4vm-naive-ssm"])
def test_each_site_gets_its_own_width_and_keeps_its_quantizer(recipe):
    plain, act = _site_ctors(recipe)
    mixed, act_mixed = _site_ctors(recipe, site_bits={"dA": 6, "h": 8})
    assert (act_mixed.quant_min, act_mixed.quant_max) == (act.quant_min, act.quant_max) == (0, 15)  # scan inputs
    for site, obs in mixed.items():
        assert type(obs) is type(plain[site]), site  # the recipe's quantizer, at another width
        expected = {"dA": 63, "h": 255}.get(site, 15)
        assert (obs.quant_min, obs.quant_max) == (0, expected), site


def test_tgq_and_ltsq_options_survive_a_new_width():
    sites, _ = _site_ctors("qmamba", site_bits={"h": 8, "dBu": 8}, tgq_groups=4, ltsq_form="log2")
    assert isinstance(sites["h"], TGQObserver) and sites["h"].num_groups == 4 and sites["h"].quant_max == 255
    assert isinstance(sites["dBu"], LtSQObserver) and sites["dBu"].form == "log2" and sites["dBu"].quant_max == 255
    assert sites["dA"].form == "log2" and sites["dA"].quant_max == 15


def test_float_sites_stay_float():
    from dataclasses import replace

    assert qmamba_ao.get_qconfig_mapping("ptq4vm", 4, 4, site_bits={"h": 8}).object_type_qconfigs[SelectiveScan] is None
    float_h = replace(get_recipe("qmamba"), name="qmamba-float-h", h=None)
    sites, _ = _site_ctors(float_h, site_bits={"h": 8, "y": 8})
    assert set(sites) == {"dA", "dBu", "y"} and sites["y"].quant_max == 255


def test_prepared_model_has_8_bit_h_and_4_bit_other_sites(vim, images):
    prepared = qmamba_ao.prepare(vim, (images[0],), "qmamba", 4, 4, site_bits={"h": 8})
    scans = _scans(prepared)
    assert scans
    for scan in scans:
        ranges = {s: (m.quant_min, m.quant_max) for s, m in scan.site_modules.items()}
        assert ranges == {"dA": (0, 15), "dBu": (0, 15), "h": (0, 255), "y": (0, 15)}, ranges
    qmamba_ao.calibrate(prepared, images[:1], progress=False)
    converted = qmamba_ao.convert(prepared, reference=True)
    for scan in _scans(converted):
        ranges = {s: (m.quant_min, m.quant_max) for s, m in scan.site_modules.items()}
        assert ranges == {"dA": (0, 15), "dBu": (0, 15), "h": (0, 255), "y": (0, 15)}, ranges


# -- labels and the command-line form -------------------------------------------------------------


def test_bits_label_lists_the_sites_that_differ():
    assert bits_label(4, 4) == "W4A4"
    assert bits_label(4, 4, {"h": 8}) == "W4A4, h8"
    assert bits_label(4, 4, {"h": 8, "dA": 8}) == "W4A4, dA8 h8"  # site order, not the dict's
    assert bits_label(4, 4, {"h": 4, "y": 6}) == "W4A4, y6"  # a site at a_bits is not listed
    assert bits_label(6, 6, {}) == "W6A6"
    assert bits_label(4, 4, first_last_bits=None) == "W4A4, first/last W4A4"
    assert bits_label(4, 8, {"dBu": 6}, first_last_bits=6) == "W4A8, dBu6, first/last W6A6"
    with pytest.raises(ValueError, match="unknown scan site"):
        bits_label(4, 4, {"c": 8})
    with pytest.raises(ValueError, match="a_bits=9"):
        bits_label(4, 9)


def test_parse_site_bits():
    assert parse_site_bits("h=8,dA=8") == {"h": 8, "dA": 8}
    assert parse_site_bits(" dBu = 6 ") == {"dBu": 6}


@pytest.mark.parametrize(
    "spec, message",
    [
        ("", r"give comma-separated SITE=BITS pairs"),
        ("h", r"'h' is not SITE=BITS"),
        ("h=8,", r"'' is not SITE=BITS"),
        ("hh=8", r"unknown scan site 'hh' \(did you mean 'h'\?\)"),
        ("h=9", r"h=9 is outside 2..8"),
        ("h=eight", r"'eight' for 'h' is not an integer"),
        ("h=8,h=6", r"site 'h' is given twice"),
    ],
)
def test_parse_site_bits_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_site_bits(spec)


def test_saved_model_keeps_site_bits_and_the_log2_form(tmp_path):
    """The options travel in the saved record and the grid each log2-form site chose in its state:
    the rebuilt model (built without weights, so its own calibration would choose differently) equals it."""
    import timm
    import torch

    from qmamba_ao import api
    from qmamba_ao.observers import FrozenLtSQLog2

    torch.manual_seed(0)
    model = timm.create_model("vim_fmnist", pretrained=False).eval()
    options = {"ltsq_form": "log2", "site_bits": {"h": 8}}
    q = qmamba_ao.quantize(model, [torch.randn(8, 1, 28, 28)], "qmamba-ltsq-only", 4, 4, progress=False, **options)
    sites = [m for m in q.modules() if isinstance(m, FrozenLtSQLog2)]
    assert sites
    for m in sites:  # a choice that no calibration of the rebuilt model would make
        m.kind_id.fill_(6 if m.kind != "signed_log2" else 0)
    api.save_quantized(tmp_path / "q.pt", q, "vim_fmnist", "qmamba-ltsq-only", 4, 4, options)
    loaded, record = api.load_quantized(tmp_path / "q.pt")
    assert record["options"] == options
    assert [m.kind for m in loaded.modules() if isinstance(m, FrozenLtSQLog2)] == [m.kind for m in sites]
    for scan in _scans(loaded):
        assert scan.site_modules["h"].quant_max == 255 and scan.site_modules["y"].quant_max == 15
    images = torch.randn(4, 1, 28, 28)
    with torch.inference_mode():
        assert torch.equal(loaded(images), q(images))
