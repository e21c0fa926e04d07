"""The README and the product's own texts, as a user reads them: every recipe and make target
documented, a troubleshooting section, no reference to files a user does not have."""

import re
from pathlib import Path

from pipeline.config import list_recipes

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text()


def product_files():
    for folder in ("pipeline", "jobs", "infra", "benchmarks"):
        yield from (p for p in (REPO / folder).rglob("*") if p.is_file() and p.suffix in (".py", ".yaml", ".md", ".sh"))
    yield REPO / "README.md"
    yield REPO / "Makefile"


def test_no_product_text_cites_a_design_file_users_do_not_have():
    cites = [str(p.relative_to(REPO)) for p in product_files() if "DESIGN.md" in p.read_text()]
    assert cites == []


def test_every_recipe_and_make_target_is_documented():
    for name in list_recipes():
        assert f"`{name}`" in README, name
    targets = re.findall(r"^([a-z][a-z-]*):", (REPO / "Makefile").read_text(), flags=re.M)
    for t in set(targets) - {"help", "data"}:
        assert re.search(rf"`make {t}`|`{t}`", README), t
    for var in ("EVAL_WORKERS", "EVAL_LIMIT", "RECIPE", "INCEPTION_DEVICE", "check_resources", "reference_batch"):
        assert var in README, var


def test_troubleshooting_covers_what_users_meet():
    section = README.split("## Troubleshooting", 1)[1]
    for topic in ("/dev/shm", "NCCL", "nvidia-dali-cuda130", "144 crops", "autoscaler", "--working-dir"):
        assert topic in section, topic


def test_figures_name_the_machine_they_were_measured_on():
    assert "this 2-core machine" not in README
    assert "about 2.5 minutes" not in (REPO / "pipeline" / "recipes" / "demo.yaml").read_text()


def test_unused_dependencies_are_not_declared():
    pyproject = (REPO / "pyproject.toml").read_text()
    assert '"tqdm' not in pyproject and '"requests' not in pyproject


def test_gpu_texts_speak_to_a_user_with_a_gpu():
    """The GPU sections are instructions for the user's own machine, online and offline; nothing in the
    product describes how it is developed."""
    words = ["lent", "carry=", ".gpu-carry", "per call", "device call", "a call carries", "no session",
             "warm machine"]
    found = [(str(p.relative_to(REPO)), w) for p in product_files() for w in words
             if re.search(rf"(?<![\w-]){re.escape(w)}(?![\w])", p.read_text())]
    assert found == []
    gpu = README.split("## Run on your GPU", 1)[1].split("\n## ", 1)[0]
    assert "pip install -e ." in gpu and "python benchmarks/gpu/run.py --out gpu-results" in gpu  # online
    assert "make gpu-kit" in gpu and "python benchmarks/gpu/run.py --install gpu-kit --out gpu-results" in gpu
