import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# The CUDA plugin (the [gpu] extra, for compiling for GPUs) checks its CUDA versions with cuInit when JAX first
# looks for plugins, fails on this GPU-less machine and is then never registered: skip the check (pbe_jax.aot's
# own prepare_host does the same, too late for a process whose JAX has already started).
os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
# gs:// through gcsfs, which can be pointed at the local GCS fake (the `gcs_emulator` fixture), not through
# tf.io.gfile. epath decides once per process, at its first use of any path, hence here.
os.environ["EPATH_USE_TF"] = "false"
# One persistent compilation cache for the session, so that the many train.py / sample.py subprocesses of the
# suite compile each program once (a fresh, empty folder: no state from earlier sessions).
_CACHE = tempfile.mkdtemp(prefix="pbe_jax_test_jit_cache_")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# pytest -n 2 on a 2-core machine (CI): each worker, and every train.py / sample.py it starts, computes on one
# thread. Otherwise PyTorch's and XLA's thread pools, two per worker, fight over the two cores (a tiny PyTorch
# step measured 3× slower oversubscribed than on one thread). Without xdist, everything runs as configured.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} --xla_cpu_multi_thread_eigen=false".strip()


def xla_env(**flags) -> dict:
    """os.environ for a subprocess on the CPU with these XLA flags added to the ones set above
    (e.g. xla_force_host_platform_device_count=8)."""
    extra = " ".join(f"--{k}={v}" for k, v in flags.items())
    return {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {extra}".strip()}


import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

TINY_NAMES = ("sd", "alt")


# The modules whose tests take a minute or more, first: under `pytest -n 2 --dist worksteal` both workers then
# start on long tests and end on short ones, instead of one of them waiting for the other's last long test.
LONG_FIRST = ("test_train.py", "test_bench.py", "test_aot.py", "test_aot_gpu.py", "test_train_parity.py",
              "test_cocoee_protocol.py", "test_lora.py", "test_splash.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(LONG_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(LONG_FIRST)))  # stable: each module's order kept


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(_CACHE, ignore_errors=True)


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A factory: the diffusers folder of tiny random pipeline `name`, saved once per session."""
    from pbe_jax.parity import reference

    cache = {}

    def get(name: str):
        if name not in cache:
            cache[name] = reference.save_tiny(tmp_path_factory.mktemp(f"tiny_{name}"), name)
        return cache[name]

    return get


@pytest.fixture(scope="session")
def tiny_pair(tiny_folder):
    """A factory: (PyTorch modules, JAX models) loaded from the same tiny folder."""
    from pbe_jax.convert import load
    from pbe_jax.parity import reference

    cache = {}

    def get(name: str):
        if name not in cache:
            folder = tiny_folder(name)
            cache[name] = (reference.load_torch(folder), load(folder))
        return cache[name]

    return get


SMALL_BENCHMARK = {"n": 6, "image_size": 96, "reference_size": 80}


@pytest.fixture(scope="session")
def bench(tmp_path_factory):
    """The synthetic held-out benchmark at a small size (SMALL_BENCHMARK), made once per session; a test that
    changes it works on a copy."""
    from pbe_jax.data import benchmark

    out = tmp_path_factory.mktemp("bench")
    benchmark.make_benchmark(out, **SMALL_BENCHMARK)
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


BUCKET = "pbe-jax-test"


@pytest.fixture(scope="session")
def gcs_emulator():
    """A local Google Cloud Storage fake (tests/fake_gcs.py, in memory) on 127.0.0.1 with the bucket
    gs://pbe-jax-test, and the environment that points this project's clients at it, set in os.environ for the
    rest of the session so that subprocesses inherit it: gcsfs (STORAGE_EMULATOR_HOST; EPATH_USE_TF=false, set
    above, makes epath use it rather than tf.io.gfile, whose GCS client has no endpoint setting) and tensorstore,
    which writes orbax's arrays (TENSORSTORE_GCS_HTTP_URL, a fixed token), and array_record's GCS reader, which
    reads prepared shards (CLOUD_STORAGE_EMULATOR_ENDPOINT). Stopped, and everything in it gone,
    at the end."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, os.path.join(os.path.dirname(__file__), "fake_gcs.py"), "--port",
                             str(port), "--bucket", BUCKET], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.time() > deadline:
                proc.kill()
                pytest.fail(f"the GCS fake did not start: {proc.stderr.read().decode()[-2000:]}")
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {"STORAGE_EMULATOR_HOST": url, "TENSORSTORE_GCS_HTTP_URL": url, "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake",
           "CLOUD_STORAGE_EMULATOR_ENDPOINT": url,  # array_record's GCS reader (google-cloud-cpp)
           "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false", "NO_GCE_CHECK": "true"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    yield env
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def bucket_dir(gcs_emulator, request):
    """gs://pbe-jax-test/<test name>, removed after the test."""
    from pbe_jax import storage

    folder = storage.path(f"gs://{BUCKET}/{request.node.name}")
    yield folder
    storage.remove_tree(folder)
