from pathlib import Path

import pytest

from derive.build import STYLE_DIRS
from derive.spec import load_catalog
from derive.testing import has_kinks, load_module

ROOT = Path(__file__).resolve().parent.parent
GENERATED = ROOT / "generated"
CATALOG = load_catalog()
OPS = [op.name for op in CATALOG.ops]
STYLES = list(STYLE_DIRS)
KINK_OPS = [op.name for op in CATALOG.ops if has_kinks(op)]


def generated_module(op_name: str, style: str = "contraction"):
    return load_module(GENERATED / STYLE_DIRS[style] / f"{op_name}.py")


@pytest.fixture(params=OPS)
def op(request):
    return CATALOG.op(request.param)


@pytest.fixture(params=STYLES)
def style(request):
    return request.param
