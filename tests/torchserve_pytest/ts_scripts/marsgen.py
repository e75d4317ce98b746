"""Stand-in for TorchServe's ts_scripts/marsgen.py (see CHANGES.md).

TorchServe's version downloads each model's weights from download.pytorch.org and archives them
with the examples' model files. There is no network here, so this one archives the local
stand-ins of standins/build.py under the same model names, with the same `torch-model-archiver`
command line (so the archiver on PATH, TorchServe's or Osprey's, is what builds them), and links
them into the model store the same way. Every name TorchServe's mar_config.json lists is built:
the image models as standins/tiny_classifier.py behind standins/standin_image_classifier.py (top-5
labels with probabilities, the image_classifier handler's answer), mnist from the example's own
mnist.py and mnist_handler.py with seeded weights.
"""

import os
import shutil
import subprocess
import sys

REPO_ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.append(REPO_ROOT)
# MARSGEN_STORE: where run_modules.py wants them (one folder per run), else TorchServe's place
MODEL_STORE_DIR = os.environ.get("MARSGEN_STORE") or os.path.join(REPO_ROOT, "model_store_gen")
os.makedirs(MODEL_STORE_DIR, exist_ok=True)

_STANDIN_IMAGE = {
    "model_file": "standins/tiny_classifier.py",
    "serialized_file_local": "standins/tiny_classifier.pt",
    "handler": "standins/standin_image_classifier.py",
    "extra_files": "standins/index_to_name.json,standins/standin_vision.py",
}
MODELS = [
    {"model_name": name, "version": "1.0", **_STANDIN_IMAGE}
    for name in ("fastrcnn", "alexnet", "densenet161", "resnet-152-batch", "resnet-18", "squeezenet1_1",
                 "vgg16", "deeplabv3_resnet_101_eager", "fcn_resnet_101", "maskrcnn")
] + [{
    "model_name": "mnist",
    "version": "1.0",
    "model_file": "examples/image_classifier/mnist/mnist.py",
    "serialized_file_local": "examples/image_classifier/mnist/mnist_cnn.pt",
    "handler": "examples/image_classifier/mnist/mnist_handler.py",
    "extra_files": "standins/standin_vision.py",
}]


def delete_model_store_gen_dir():
    print(f"## Deleting model_store_gen_dir: {MODEL_STORE_DIR}\n")
    mar_set.clear()
    if os.path.exists(MODEL_STORE_DIR):
        try:
            shutil.rmtree(MODEL_STORE_DIR)
        except OSError as e:
            print("Error: %s : %s" % (MODEL_STORE_DIR, e.strerror))


mar_set = set()


COMPLETE = ".complete"  # written once every archive is built: a later process reuses them


def gen_mar(model_store=None):
    print(f"## Starting gen_mar: {model_store}\n")
    if len(mar_set) == 0:
        if os.path.exists(os.path.join(MODEL_STORE_DIR, COMPLETE)):
            # built beforehand (run_modules.py builds them once for every module it runs, as
            # TorchServe's CI builds them once in the one pytest process that runs them all)
            mar_set.update(f"{m['model_name']}.mar" for m in MODELS)
        else:
            generate_mars(model_store_dir=MODEL_STORE_DIR)

    if model_store is not None and os.path.exists(model_store):
        print("## Create symlink for mar files\n")
        for mar_file in mar_set:
            src = f"{MODEL_STORE_DIR}/{mar_file}"
            dst = f"{model_store}/{mar_file}"
            if os.path.exists(dst):
                print(f"## {dst} already exists.\n")
            else:
                os.symlink(src, dst)
                print(f"## Symlink {src}, {dst} successfully.")


def generate_model(model, model_store_dir):
    cmd = model_archiver_command_builder(
        model["model_name"],
        model["version"],
        model.get("model_file"),
        model["serialized_file_local"],
        model.get("handler"),
        model.get("extra_files"),
        model.get("runtime"),
        model.get("archive_format", "zip-store"),
        model.get("requirements_file"),
        model.get("export_path", model_store_dir),
    )
    print(f"## In directory: {os.getcwd()} | Executing command: {cmd}\n")
    try:
        subprocess.check_call(cmd, shell=True)
        marfile = "{}.mar".format(model["model_name"])
        print("## {} is generated.\n".format(marfile))
        mar_set.add(marfile)
    except subprocess.CalledProcessError as exc:
        print("## {} creation failed !, error: {}\n".format(model["model_name"], exc))


def generate_mars(mar_config=None, model_store_dir=MODEL_STORE_DIR):
    from standins.build import build

    build()
    mar_set.clear()
    cwd = os.getcwd()
    os.chdir(REPO_ROOT)
    try:
        for model in MODELS:
            generate_model(model, model_store_dir)
    finally:
        os.chdir(cwd)


def model_archiver_command_builder(
    model_name=None,
    version=None,
    model_file=None,
    serialized_file=None,
    handler=None,
    extra_files=None,
    runtime=None,
    archive_format=None,
    requirements_file=None,
    export_path=None,
    force=True,
):
    cmd = "torch-model-archiver"
    if model_name:
        cmd += " --model-name {0}".format(model_name)
    if version:
        cmd += " --version {0}".format(version)
    if model_file:
        cmd += " --model-file {0}".format(model_file)
    if serialized_file:
        cmd += " --serialized-file {0}".format(serialized_file)
    if handler:
        cmd += " --handler {0}".format(handler)
    if extra_files:
        cmd += " --extra-files {0}".format(extra_files)
    if runtime:
        cmd += " --runtime {0}".format(runtime)
    if archive_format:
        cmd += " --archive-format {0}".format(archive_format)
    if requirements_file:
        cmd += " --requirements-file {0}".format(requirements_file)
    if export_path:
        cmd += " --export-path {0}".format(export_path)
    if force:
        cmd += " --force"
    return cmd
