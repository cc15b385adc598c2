"""The dependency rule of README's Layout: a module imports only from its own layer or the layers above it."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "rptq_cli"

LAYERS = [  # README, Layout: top (1) to bottom (8); a module of layer i may import layers 1..i
    {"errors", "points", "config"},
    {"quant"},
    {"kernels", "_C"},
    {"nn"},
    {"models"},
    None,  # the pipeline: every other module of rptq_cli
    {"cli"},
    {"bench"},
]
ALLOWED = {("cli", "bench")}  # `rptq bench` is the one command that runs the lab


def layer_of(top: str) -> int:
    pipeline = LAYERS.index(None)
    return next((i for i, names in enumerate(LAYERS) if names and top in names), pipeline)


def imported_tops(path: Path) -> set[str]:
    """The top-level rptq_cli modules or packages ``path`` imports (anywhere in the file, lazy imports too)."""
    package = path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1]  # e.g. ("rptq_cli", "nn")
    tops = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                parts = [*base, *(node.module.split(".") if node.module else [])]
                names = [parts] if node.module else [[*parts, a.name] for a in node.names]
            else:
                names = [node.module.split(".")] if node.module else []
        elif isinstance(node, ast.Import):
            names = [a.name.split(".") for a in node.names]
        else:
            continue
        tops |= {parts[1] for parts in names if len(parts) > 1 and parts[0] == "rptq_cli"}
    return tops


def test_no_module_imports_a_layer_below_it():
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        own = path.relative_to(PACKAGE).parts[0].removesuffix(".py")
        if own == "__init__":
            continue
        for top in imported_tops(path) - {own}:
            if layer_of(top) > layer_of(own) and (own, top) not in ALLOWED:
                wrong.append(f"{path.relative_to(PACKAGE.parent)} imports rptq_cli.{top}")
    assert not wrong, "\n".join(wrong)


def test_the_rule_is_checked():
    assert imported_tops(PACKAGE / "nn" / "linear.py") >= {"kernels", "config", "quant", "nn"}
    assert layer_of("quantize") > layer_of("nn") > layer_of("kernels") > layer_of("quant") > layer_of("config")
