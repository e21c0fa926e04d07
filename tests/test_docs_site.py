"""The docs site and the make targets around it: the generated reference pages match the code, the site
builds under `mkdocs build --strict`, every relative link and anchor of the built site and of README.md
resolves (nothing is fetched from the internet), and the Makefile's demo/services/serving commands."""

from __future__ import annotations

import html.parser
import os
import re
import shutil
import subprocess
import sys
import urllib.parse
from pathlib import Path

import pytest
from conftest import BIN, REPO

DOCS_ENV = {**os.environ, "NO_MKDOCS_2_WARNING": "1", "PATH": f"{BIN}:{os.environ['PATH']}"}


def generate(out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)


def test_generated_reference_pages_match_the_code(tmp_path):
    p = generate(tmp_path)
    assert p.returncode == 0, p.stderr
    for name in ("cli.md", "config.md"):
        page = REPO / "docs" / "reference" / name
        assert page.is_file(), f"{page} is missing: run `make docs`"
        assert page.read_text() == (tmp_path / name).read_text(), \
            f"docs/reference/{name} differs from what the code gives: run `make docs` and commit the page"
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--check", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 0, check.stderr
    (tmp_path / "config.md").write_text((tmp_path / "config.md").read_text().replace("| yes |", "| no |", 1))
    check = subprocess.run([sys.executable, str(REPO / "scripts" / "gen_docs.py"), "--check", "--out", str(tmp_path)],
                           capture_output=True, text=True, timeout=120)
    assert check.returncode == 1 and "config.md" in check.stderr and "make docs" in check.stderr


def test_generated_pages_cover_every_option_and_field(tmp_path):
    """Every option of every job's parser and every config field is on its page, with the fingerprint
    column as the code decides it."""
    import dataclasses

    sys.path.insert(0, str(REPO / "scripts"))
    import gen_docs

    from pipeline.config import ShardConfig, TrainConfig

    assert generate(tmp_path).returncode == 0
    cli, config = (tmp_path / "cli.md").read_text(), (tmp_path / "config.md").read_text()
    for _, run, path in gen_docs.JOBS:
        assert f"`{run}`" in cli
        for action in gen_docs.job_parser(path)._actions:
            for opt in action.option_strings or [action.metavar]:
                assert opt in cli, (run, opt)
    rows = {line.split("|")[1].strip().strip("`"): line for line in config.splitlines() if line.startswith("| `")}
    fingerprint = TrainConfig().result_settings()
    for section in dataclasses.fields(TrainConfig):
        if section.name == "recipe":
            continue
        for f in dataclasses.fields(section.default_factory):
            key = f"{section.name}.{f.name}"
            assert key in rows, key
            cells = [c.strip() for c in rows[key].split("|")]
            assert cells[5], f"{key} has no description: write a comment next to the field in pipeline/config.py"
            assert cells[4].startswith("yes") == (key in fingerprint or key in gen_docs.CONDITIONAL_FINGERPRINT), key
    assert "`model.precision`" in config and rows["data.device"].split("|")[4].strip().startswith("yes")
    assert rows["data.shards"].split("|")[4].strip() == "no"
    shard_fp = ShardConfig().fingerprint()
    for f in dataclasses.fields(ShardConfig):
        assert f.name in rows and rows[f.name].split("|")[5].strip().startswith("yes") == (
            f.name in shard_fp or f.name in ("max_file_mb", "max_megapixels")), f.name


# ------------------------------------------------------------------------------------------ the site

def mkdocs_build(config_dir: Path, site: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "mkdocs"), "build", "--strict", "--site-dir", str(site)], cwd=config_dir,
                          capture_output=True, text=True, env=DOCS_ENV, timeout=300)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """The real docs/ built with --strict, as `make docs` builds it."""
    out = tmp_path_factory.mktemp("site")
    p = mkdocs_build(REPO, out)
    assert p.returncode == 0, "mkdocs build --strict failed (run `make docs`):\n" + p.stderr[-4000:]
    return out


def test_site_builds_strict_with_every_page_of_the_nav(site):
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("tag:yaml.org,2002:python/", lambda *a: None)  # the slugify entry
    nav = yaml.load((REPO / "mkdocs.yml").read_text(), Loader=Loader)["nav"]

    def pages(entries):
        for e in entries:
            for v in e.values():
                yield from (pages(v) if isinstance(v, list) else [v])

    for page in pages(nav):
        assert (site / page.replace(".md", ".html")).is_file(), page
    assert "--samples-per-shard" in (site / "reference" / "cli.html").read_text()  # the generated pages are in


def test_strict_build_refuses_a_broken_link_and_anchor(tmp_path):
    """What makes the site's own link check: mkdocs.yml's validation turns an unresolved link or anchor
    into a warning, which --strict fails on."""
    shutil.copy(REPO / "mkdocs.yml", tmp_path)
    shutil.copytree(REPO / "docs", tmp_path / "docs")
    assert mkdocs_build(tmp_path, tmp_path / "ok").returncode == 0
    page = tmp_path / "docs" / "index.md"
    page.write_text(page.read_text() + "\n[a](reference/config.md#no-such-field)\n")
    p = mkdocs_build(tmp_path, tmp_path / "anchor")
    assert p.returncode != 0 and "no-such-field" in p.stderr
    page.write_text(page.read_text() + "\n[b](no-such-page.md)\n")
    p = mkdocs_build(tmp_path, tmp_path / "page")
    assert p.returncode != 0 and "no-such-page.md" in p.stderr


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links, self.ids = [], set()

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        for key in ("id", "name") if tag == "a" else ("id",):
            if a.get(key):
                self.ids.add(a[key])
        for key in ("href", "src"):
            if a.get(key) is not None:
                self.links.append(a[key])


def parse_html(path: Path) -> _Links:
    p = _Links()
    p.feed(path.read_text(errors="replace"))
    return p


def broken_site_links(site: Path) -> list[str]:
    parsed = {path: parse_html(path) for path in site.rglob("*.html")}
    broken = []
    for page, p in parsed.items():
        for link in p.links:
            url = urllib.parse.urlsplit(link)
            if url.scheme or url.netloc or link.startswith("//"):
                continue  # external: not fetched
            path = urllib.parse.unquote(url.path)
            base = site if path.startswith("/") else page.parent  # the 404 page links from the site's root
            target = page if not path else (base / path.lstrip("/")).resolve()
            if target.is_dir():
                target = target / "index.html"
            if not target.is_file() or site.resolve() not in target.resolve().parents:
                broken.append(f"{page.relative_to(site)}: {link} (no such file in the site)")
                continue
            if url.fragment and target.suffix == ".html":
                ids = parsed[target].ids if target in parsed else parse_html(target).ids
                if urllib.parse.unquote(url.fragment) not in ids:
                    broken.append(f"{page.relative_to(site)}: {link} (no such anchor)")
    return broken


def test_every_relative_link_and_anchor_of_the_built_site_resolves(site, tmp_path):
    assert not broken_site_links(site), "\n".join(broken_site_links(site))
    # the check itself finds a dead link and a dead anchor
    shutil.copytree(site, tmp_path / "s")
    page = tmp_path / "s" / "index.html"
    page.write_text(page.read_text() + '<a href="gone.html">x</a><a href="reference/cli.html#nothing">y</a>')
    found = broken_site_links(tmp_path / "s")
    assert any("gone.html" in b for b in found) and any("#nothing" in b for b in found)


# ------------------------------------------------------------------------------------------ README.md

def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: its text lower-cased, punctuation but '-' and '_' dropped,
    spaces as '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # [text](url) -> text
    text = re.sub(r"<[^>]+>", "", text).replace("`", "").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors_of(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in md.read_text().splitlines():
        if line.lstrip().startswith(("```", "~~~")):
            in_code = not in_code
        if in_code:
            continue
        m = re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
        if m:
            slug = github_slug(m.group(1))
            out.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
        out.update(re.findall(r"<a\s+(?:id|name)=\"([^\"]+)\"", line))
    return out


def markdown_links(md: Path) -> list[str]:
    text = re.sub(r"(?ms)^\s*(```|~~~).*?^\s*\1", "", md.read_text())  # fenced code is not links
    text = re.sub(r"`[^`\n]*`", "", text)
    return re.findall(r"\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)", text) + \
        re.findall(r"^\s*\[[^\]]+\]:\s*(\S+)", text, flags=re.M) + re.findall(r"<img[^>]+src=\"([^\"]+)\"", text)


def broken_markdown_links(md: Path, root: Path) -> list[str]:
    broken = []
    for link in markdown_links(md):
        url = urllib.parse.urlsplit(link)
        if url.scheme or url.netloc:
            continue  # external: not fetched
        target = md if not url.path else (md.parent / urllib.parse.unquote(url.path)).resolve()
        if not target.exists() or root.resolve() not in [target, *target.parents]:
            broken.append(f"{link} (no such file in the repository)")
        elif url.fragment and target.suffix == ".md" and url.fragment not in anchors_of(target):
            broken.append(f"{link} (no such heading)")
    return broken


def test_readme_relative_links_and_anchors_resolve(tmp_path):
    readme = REPO / "README.md"
    assert markdown_links(readme), "README.md has no links to check"
    assert not broken_markdown_links(readme, REPO), "\n".join(broken_markdown_links(readme, REPO))
    # the check itself finds a dead file and a dead heading
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# Title\n\n## Run `make up` on ImageNet\n")
    bad = tmp_path / "README.md"
    bad.write_text("[ok](docs/a.md#run-make-up-on-imagenet) [gone](docs/b.md) [x](docs/a.md#nothing) "
                   "[web](https://example.com/x)\n```\n[code](not/a/link.md)\n```\n")
    found = broken_markdown_links(bad, tmp_path)
    assert len(found) == 2 and "docs/b.md" in found[0] and "#nothing" in found[1], found


# ------------------------------------------------------------------------------------------ Makefile

def make_n(*args: str) -> str:
    p = subprocess.run(["make", "-n", f"VENV={BIN.parent}", *args], cwd=REPO, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_demo_budget_applies_to_the_demo_recipe_unless_given():
    def train_line(out: str) -> str:
        return next(line for line in out.splitlines() if "jobs/train_ensemble.py" in line
                    or "--set data.shards" in line)

    assert "--budget-minutes" in make_n("demo")
    full = make_n("demo", "RECIPE=fashion-mnist-full", "EVAL_LIMIT=10000")
    assert "--budget-minutes" not in full and "--limit 10000" in full, train_line(full)
    assert "--budget-minutes" in make_n("demo", "RECIPE=fashion-mnist-full", "DEMO_MINUTES=30")
    assert "--budget-minutes" not in make_n("demo", "DEMO_MINUTES=")
    assert "--gpus-per-worker 0" in make_n("demo", "RECIPE=fashion-mnist-full", "GPUS_PER_WORKER=0")


def test_the_scenes_demo_shards_and_trains_the_scenes_with_its_own_budget():
    out = make_n("demo", "RECIPE=scenes")
    [shard] = [line for line in out.splitlines() if "jobs/shard_dataset.py" in line]
    assert "--source fashion-mnist-scenes" in shard, shard
    assert "--set data.shards=" in out and "/shards/fashion-mnist-scenes --set" in out
    assert "36 * 70 / 100" in out and "--ensemble-run ensemble-scenes" in out
    plain = make_n("demo")
    assert "--source fashion-mnist " in plain and "/shards/fashion-mnist --set" in plain and "20 * 75 / 100" in plain


def test_make_up_needs_no_dataset_but_demo_installs_it(tmp_path):
    """On a machine without Fashion-MNIST (an ImageNet box) `make up` does not ask for it; `make demo`
    still makes sure the demo's data is there. (test_e2e.py starts the services with `make up` on such a
    machine.)"""
    missing = tmp_path / "no-fashion-mnist"
    assert "ensure_fashion_mnist.sh" not in make_n("up", f"FMNIST_ROOT={missing}")
    assert f"ensure_fashion_mnist.sh {missing}" in make_n("demo", f"FMNIST_ROOT={missing}")


def test_demo_check_refuses_a_gpu_recipe_on_a_cluster_without_gpus(ray_cluster):
    import ray

    if ray.cluster_resources().get("GPU", 0):
        pytest.skip("this machine's Ray cluster has GPUs: the refusal is for clusters without")

    def check(*args):
        return subprocess.run([sys.executable, str(REPO / "scripts" / "demo_check.py"), "--address",
                               ray_cluster.address, *args], capture_output=True, text=True,
                              env=ray_cluster.env, timeout=120)

    p = check("--recipe", "fashion-mnist-full")
    assert p.returncode == 2 and "has no GPU" in p.stderr and "GPUS_PER_WORKER=0" in p.stderr, p.stderr
    assert len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert check("--recipe", "fashion-mnist-full", "--gpus-per-worker", "0").returncode == 0
    assert check("--recipe", "demo").returncode == 0
    bad = check("--recipe", "no-such-recipe")
    assert bad.returncode == 2 and "not found" in bad.stderr


def test_serving_port_is_not_mlflows():
    out = make_n("serve")
    assert "-h 127.0.0.1 -p 5001" in out and "MLFLOW_TRACKING_URI=http://127.0.0.1:5000" in out
    p = subprocess.run(["make", "-s", "-o", f"{BIN.parent}/.installed", f"VENV={BIN.parent}", "serve", "MLFLOW_PORT=5001"], cwd=REPO,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and "SERVE_PORT=5001 is MLflow's port" in p.stderr, p.stderr
