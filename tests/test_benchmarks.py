"""The benchmark scripts run end to end at tiny sizes and print their figures."""

import subprocess
import sys

from conftest import ROOT

sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402


def run_bench(script, *args):
    return subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)


def test_sampling_benchmark_prints_table_and_figures():
    proc = run_bench("sampling.py", "--train-epochs", "1", "--per-class", "1", "--steps", "2",
                     "--set", "unet-channels=8,16", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    rows = [line for line in lines if line.startswith("| ") and "steps" not in line]
    assert [r.split(" | ")[0:2] for r in rows] == [["| ddpm", "1000"], ["| ddim", "2"],
                                                    ["| dpm-solver", "2"]]
    assert rows[0].endswith("| 1.0x |")
    assert lines[-2].startswith("speedup=") and lines[-1].startswith("fidelity_drop=")
    value = lines[-2].split("=")[1]
    assert value == "nan" or float(value) > 1.0  # a 2-step sampler is faster than 1000 steps


def test_sampling_benchmark_rejects_bad_config_cleanly():
    proc = run_bench("sampling.py", "--set", "alhpa=1")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "unknown config key 'alhpa' (did you mean 'alpha'?)" in proc.stderr


def test_sampling_benchmark_names_a_missing_data_folder():
    proc = run_bench("sampling.py", "--set", "dataset=cifar10", "--set", "data-dir=/nonexistent/c")
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "/nonexistent/c" in proc.stderr and "cifar-10-batches-py" in proc.stderr


def test_accuracy_grid_is_the_cross_product_in_order():
    assert accuracy.settings([]) == [{}]
    assert accuracy.settings(["alpha=0.1,0.5", "augment-ratio=0,1"]) == [
        {"alpha": "0.1", "augment-ratio": "0"}, {"alpha": "0.1", "augment-ratio": "1"},
        {"alpha": "0.5", "augment-ratio": "0"}, {"alpha": "0.5", "augment-ratio": "1"}]


def test_accuracy_mean_std_uses_sample_std():
    assert accuracy.mean_std([0.5, 0.7, 0.9]) == "70.0 ± 20.0"
    assert accuracy.mean_std([0.25]) == "25.0 ± 0.0"


def test_accuracy_rows_are_named_settings():
    rows = accuracy.named_rows(["plain: cfg-dropout=0 guidance-scale=1",
                                "preset:", "w5: guidance-scale=5 unet-channels=8,16"])
    assert rows == {"plain": {"cfg-dropout": "0", "guidance-scale": "1"}, "preset": {},
                    "w5": {"guidance-scale": "5", "unet-channels": "8,16"}}


def test_accuracy_ddpm_table_reports_corrections_and_server_time():
    plain = {"timings": {"diffusion": 100.0}, "diffusion": {"history": [
        {"grid_fidelity": 0.5}, {"grid_fidelity": 0.9}]}}
    fed = {"timings": {"diffusion": 90.0, "local-ddpm": 30.0},
           "auxiliary": {"corrections": 8, "server_seconds": 40.0},
           "diffusion": {"history": [{"grid_fidelity": 1.0, "aux_loss": 0.2,
                                      "aux_loss_after": 0.125}]}}
    lines = accuracy.ddpm_table({"fedavg": [plain], "fedddpm": [fed, fed]}, "s").splitlines()
    assert lines[2] == "| fedavg | 90.0 ± 0.0 |  |  |  |  | 100 | 1 |"
    assert lines[3] == "| fedddpm | 100.0 ± 0.0 | 0.12 ± 0.00 | 8.0 | 40 | 30 | 90 | 2 |"


def test_precision_benchmark_compares_float32_with_bf16():
    proc = run_bench("precision.py", "--train-epochs", "1", "--per-class", "2", "--steps", "1",
                     "--set", "unet-channels=8,16", "--set", "batch-size=4",
                     "--set", "diffusion-batch-size=4", "--threads", "1")
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    rows = [line.split(" | ") for line in lines if line.startswith("| ") and "step" not in line]
    assert [r[0] for r in rows] == ["| no", "| bf16"]
    assert all(0.0 <= float(r[4]) <= 100.0 for r in rows)   # fidelity, %
    keys = [line.split("=")[0] for line in lines[-4:]]
    assert keys == ["sampling_speedup", "unet_step_speedup", "classifier_step_speedup",
                    "fidelity_change"]
    assert all(float(line.split("=")[1]) > 0 for line in lines[-4:-1])
