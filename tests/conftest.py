import os
import pathlib

import pytest

import embedstore as es

SHARED = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"


# The longest test files start first: pytest-xdist hands files to its two workers in this
# order, so the workers finish together instead of one running the README alone at the end.
LONGEST_FIRST = (
    "test_readme.py", "test_readme_setup.py", "test_ray_engine.py", "test_evaluation.py", "test_ray_index.py",
    "test_offline_hub.py",
)  # fmt: skip


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.fixture(scope="session")
def shared_data():
    if not SHARED.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{SHARED} is missing; CI needs ../shared/data beside the repository")
        pytest.skip("../shared/data not present")
    return SHARED


# Shared synthetic fixtures, built through embedstore.testing (session-scoped: written once per run).
@pytest.fixture(scope="session")
def synthetic_slide_path(tmp_path_factory):
    """A 2,048 x 1,536 px pyramidal TIFF at 0.5 µm/px (levels 1, 2, 4) with a tissue blob."""
    from embedstore.testing import write_synthetic_slide

    return write_synthetic_slide(tmp_path_factory.mktemp("slide") / "synthetic.tif", 2048, 1536, mpp=0.5, seed=7)


@pytest.fixture(scope="session")
def synthetic_cohort(tmp_path_factory):
    """A 3-section legacy-ST cohort in the her2st layout (2,000 px slides at 1 µm/px, ~50 spots, 50 genes)."""
    from embedstore.testing import make_synthetic_cohort

    return make_synthetic_cohort(
        tmp_path_factory.mktemp("cohort"), n_slides=3, n_spots=60, n_genes=50, seed=0, width=2000, height=2000, mpp=1.0
    )


@pytest.fixture
def one_torch_thread():
    """Tiny models train fastest on one thread, and other jobs may share the cores."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


# A tiny reference cohort, its store, a recipe and the index built from them: module-scoped, so
# each test module gets its own copy, which its tests may damage.
RECIPE = (
    'name = "tiny"\nencoder = "builtin"\ncohort = "synthetic"\n[panel]\nmethod = "hvg"\nn_genes = 20\n'
    '[aligner]\nproj_dim = 16\nmax_epochs = 3\n[index]\nfactory = "Flat"\n[aggregator]\nname = "mean"\nk = 5\n'
)


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    """Three 1,200 px sections at 1 µm/px, 30 spots and 30 genes each."""
    from embedstore.testing import make_synthetic_cohort

    return make_synthetic_cohort(
        tmp_path_factory.mktemp("cohort"), n_slides=3, n_spots=30, n_genes=30, seed=0, width=1200, height=1200, mpp=1.0
    )


@pytest.fixture(scope="module")
def store(cohort, tmp_path_factory):
    """The cohort embedded with the built-in encoder, as cohort ``synthetic``."""
    path = tmp_path_factory.mktemp("tiny") / "store"
    assert es.embed(cohort.root, path, cohort="synthetic", workers=0, progress=False).ok
    return path


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """:data:`RECIPE` as a file."""
    path = tmp_path_factory.mktemp("recipe") / "tiny.toml"
    path.write_text(RECIPE)
    return path


@pytest.fixture(scope="module")
def index(store, recipe, tmp_path_factory):
    """The recipe's index over the store."""
    return es.build_index(recipe, store, tmp_path_factory.mktemp("index") / "tiny.index")
