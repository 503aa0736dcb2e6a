"""The documentation builds without a warning, and has what it promises.

One Sphinx build per session (``sphinx-build -W --keep-going -j 1 -b html docs <tmp>``, about 40 s on
two cores; ``-j auto`` is no faster there), then checks on its HTML: the index, a page per public
module, a model's page with the signature and ``Parameters`` generated from its hyperparameter
dataclass, the architecture page and the tutorials with their figures. The build needs the ``docs``
packages (sphinx, myst-parser, numpydoc), which the ``test`` extra carries.
"""

from __future__ import annotations

import dataclasses
import html
import os
import pkgutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("docs_html")
    command = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-j", "1", "-b", "html", "docs", str(out)]
    env = {**os.environ, "MPLBACKEND": "Agg"}
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    warnings = [line for line in result.stderr.splitlines() if "WARNING" in line or "ERROR" in line]
    assert result.returncode == 0, "sphinx-build failed:\n" + "\n".join(warnings or result.stderr.splitlines()[-40:])
    assert not warnings, "\n".join(warnings)
    return out


def text(page: Path) -> str:
    """The page's text without tags, entities decoded, whitespace collapsed."""
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", page.read_text())).split())


def public_modules() -> list[str]:
    import sclatent

    names = ["sclatent"]
    for info in pkgutil.walk_packages(sclatent.__path__, "sclatent."):
        if not any(part.startswith("_") for part in info.name.split(".")):
            names.append(info.name)
    return names


def test_index_links_the_guides_and_the_api(site):
    index = (site / "index.html").read_text()
    for page in ("architecture.html", "scaling.html", "tutorials.html", "api.html"):
        assert f'href="{page}' in index, page
    assert "latent-variable models for single-cell RNA-seq" in text(site / "index.html")


def test_every_public_module_has_a_page(site):
    missing = [name for name in public_modules() if not (site / "generated" / f"{name}.html").exists()]
    assert not missing, missing
    api = (site / "api.html").read_text()
    for name in ("sclatent.model", "sclatent.images", "sclatent.nn", "sclatent.cli", "sclatent.distributed"):
        assert f"generated/{name}.html" in api, name


def test_model_page_shows_the_hyperparameters(site):
    from sclatent.modules import VAEHyperparameters

    page = text(site / "generated" / "sclatent.model.VAE.html")
    # the signature generated from the dataclass (describe_hyperparameters sets __signature__) ...
    assert re.search(r"VAE \( adata : .*?\* , n_latent : int = 10 ,", page), page[:2000]
    assert "gene_likelihood : Literal [ 'zinb' , 'nb' , 'poisson' ] = 'zinb'" in page
    # ... and the numpydoc Parameters entries filled in for the {hyperparameters} marker
    assert "{hyperparameters}" not in page
    assert "n_latent int, default 10 Latent dimension." in page
    assert "gene_likelihood {'zinb', 'nb', 'poisson'}, default 'zinb'" in page
    for field in dataclasses.fields(VAEHyperparameters):
        assert f" {field.name} : " in page, f"{field.name} is not in the signature"
        assert re.search(rf" {field.name} [^:]*?, default ", page), f"{field.name} has no Parameters entry"


def test_objects_are_documented_once_under_their_public_path(site):
    generated = site / "generated"
    assert (generated / "sclatent.model.VAE.html").exists()
    assert not (generated / "sclatent.model.vae.VAE.html").exists()
    # the defining module's page links to the public one
    assert 'href="sclatent.model.VAE.html' in (generated / "sclatent.model.vae.html").read_text()


def test_architecture_and_tutorials_are_in(site):
    assert "How the house is built" in text(site / "architecture.html")
    assert (site / "scaling.html").exists()
    tutorials = sorted(path.stem for path in (ROOT / "tutorials").glob("*.md"))
    assert tutorials
    for stem in tutorials:
        assert (site / "tutorials" / f"{stem}.html").exists(), stem
    first = (site / "tutorials" / "01_vae_pbmc.html").read_text()
    figures = re.findall(r'<img[^>]*src="\.\./_images/([^"]+)"', first)
    assert figures, "the tutorial shows no figure"
    assert all((site / "_images" / name).stat().st_size > 0 for name in figures)
