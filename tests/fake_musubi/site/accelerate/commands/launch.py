"""Fake ``accelerate launch``: accepts the flags SpeedKit passes, runs the script in a child.

Like the real simple launcher it starts ``python <script> <args>`` as a child process and
returns its exit code, so the process tree (launcher -> script) matches a real run.
"""

import argparse
import os
import subprocess
import sys


def main() -> int:
    parser = argparse.ArgumentParser(prog="accelerate launch")
    parser.add_argument("--num_processes", type=int)
    parser.add_argument("--num_machines", type=int)
    parser.add_argument("--mixed_precision", choices=["no", "fp16", "bf16", "fp8"])
    parser.add_argument("--dynamo_backend")
    parser.add_argument("--num_cpu_threads_per_process", type=int)
    parser.add_argument("--gpu_ids")
    parser.add_argument("--multi_gpu", action="store_true")
    parser.add_argument("--machine_rank", type=int)
    parser.add_argument("--main_process_ip")
    parser.add_argument("--main_process_port", type=int)
    parser.add_argument("training_script")
    parser.add_argument("training_script_args", nargs=argparse.REMAINDER)
    args = parser.parse_args()
    pid_file = os.environ.get("FAKE_MUSUBI_LAUNCHER_PIDFILE")
    if pid_file:
        with open(pid_file, "w") as f:
            f.write(str(os.getpid()))
    child = subprocess.Popen([sys.executable, args.training_script, *args.training_script_args])
    return child.wait()


if __name__ == "__main__":
    sys.exit(main())
