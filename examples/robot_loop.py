"""A minimal robot loop: connect by URL, get a 50-step chunk, execute the first steps, ask again.

    pi0remote serve --policy zeros --tcp-port 8765 &   # TCP only; or a real π₀ server
    python examples/robot_loop.py tcp://127.0.0.1:8765

Replace `read_camera`, `read_joints` and `send_joint_targets` with the robot's own I/O.
"""

from __future__ import annotations

import sys
import time

import numpy as np

from pi0remote import Pi0RemoteError, connect

ACTION_HORIZON = 10  # execute this many steps of each 50-step chunk, then query again
CONTROL_DT = 0.02  # 50 Hz


def read_camera() -> np.ndarray:
    """The top camera, resized with padding to 224x224, as CHW uint8."""
    return np.zeros((3, 224, 224), dtype=np.uint8)


def read_joints() -> np.ndarray:
    return np.zeros(14, dtype=np.float32)


def send_joint_targets(targets: np.ndarray) -> None:
    pass


def main(url: str, steps: int = 200) -> None:
    with connect(url, timeout=5.0) as client:
        print(
            "policy:",
            client.metadata["policy"]["name"],
            "action shape",
            client.metadata["policy"]["action_shape"],
        )
        client.reset()
        step = 0
        while step < steps:
            try:
                reply = client.infer(
                    {"cam_high": read_camera(), "state": read_joints(), "prompt": "transfer the cube"}
                )
            except Pi0RemoteError as exc:  # typed: timeout, lost connection, bad input, policy error ...
                print("policy call failed:", exc)
                time.sleep(CONTROL_DT)
                continue
            print(
                f"step {step:4d}: round trip {reply['client_timing']['round_trip_ms']:.2f} ms, "
                f"policy {reply['inference_ms']:.2f} ms"
            )
            for targets in reply["action"][:ACTION_HORIZON]:
                send_joint_targets(targets)
                time.sleep(CONTROL_DT)
                step += 1


if __name__ == "__main__":
    main(
        sys.argv[1] if len(sys.argv) > 1 else "local://zeros",
        steps=int(sys.argv[2]) if len(sys.argv) > 2 else 200,
    )
