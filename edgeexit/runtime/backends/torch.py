"""PyTorch backend: eager on CPU; on CUDA each unit is replayed from a CUDA graph per batch size.

Rebuilds the network from the artifact's ``weights.pt`` (loaded with ``weights_only=True``).
"""

from __future__ import annotations

import threading

import numpy as np

from edgeexit.errors import ArtifactError
from edgeexit.runtime.backends.base import HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.device import cpu_name
from edgeexit.runtime.manifest import artifact_file


class TorchBackend(Runner):
    def __init__(
        self,
        manifest: dict,
        device: str | None = None,
        cuda_graphs: bool = True,
        max_graphs: int = 64,
        precision: str = "fp32",
    ) -> None:
        if precision != "fp32":
            from edgeexit.errors import UserError

            raise UserError(f"the torch backend runs fp32 only, not {precision}: use --backend onnxruntime")
        import torch

        from edgeexit.models import MultiExitConfig, build_model

        self.torch = torch
        path = artifact_file(manifest["_folder"], manifest.get("weights", "weights.pt"))
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the torch backend needs the weights; re-export the model")
        from edgeexit.runtime.artifact import check_weights_config
        from edgeexit.util import load_untrusted

        blob = load_untrusted(path, "weights file")
        check_weights_config(manifest, blob, path)  # before anything is built from it
        model = build_model(MultiExitConfig.from_dict(blob["config"]))
        model.load_state_dict(blob["state_dict"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.cuda = self.device.type == "cuda"
        self.use_graphs = cuda_graphs and self.cuda
        self.max_graphs = max_graphs
        self._graphs: dict = {}
        self._graph_failed: set = set()
        # Captured graphs share static buffers: one caller at a time on CUDA.
        self.thread_safe = not self.use_graphs
        self._lock = threading.Lock()
        device_name = torch.cuda.get_device_name(self.device) if self.cuda else cpu_name()
        self.info = RunnerInfo(
            name="torch-cuda" if self.cuda else "torch-cpu", version=torch.__version__, device=device_name
        )
        self.segments = list(self.model.segments)
        self.heads = [self._head_fn(h) for h in self.model.heads]

    def _head_fn(self, head):
        torch = self.torch

        def run(tap):
            logits, _ = head(tap)
            return logits, torch.softmax(logits, dim=1).amax(dim=1)

        return run

    def from_host(self, x: np.ndarray) -> tuple:
        t = self.torch.from_numpy(x)
        return (t.to(self.device, non_blocking=True) if self.cuda else t,)

    def _call(self, key, fn, inputs: tuple) -> tuple:
        torch = self.torch
        with torch.inference_mode():
            if not self.use_graphs or key in self._graph_failed:
                out = fn(*inputs)
                return tuple(out)
            gkey = (key, int(inputs[0].shape[0]))
            entry = self._graphs.get(gkey)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    return tuple(fn(*inputs))
                try:
                    entry = self._capture(fn, inputs)
                except RuntimeError:
                    # Capture is an optimisation: fall back to eager for this unit.
                    self._graph_failed.add(key)
                    return tuple(fn(*inputs))
                self._graphs[gkey] = entry
            graph, static_in, static_out = entry
            for dst, src in zip(static_in, inputs, strict=True):
                dst.copy_(src)
            graph.replay()
            return static_out

    def _capture(self, fn, inputs):
        torch = self.torch
        static_in = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (cuDNN autotuning, allocator) outside the capture
                fn(*static_in)
            graph = torch.cuda.CUDAGraph()
            # capture_begin/capture_end rather than torch.cuda.graph(): that context manager
            # synchronises the device and empties the allocator's cache for every new (unit, batch)
            # capture. "thread_local": CUDA work of other threads cannot invalidate this capture.
            graph.capture_begin(capture_error_mode="thread_local")
            try:
                static_out = tuple(fn(*static_in))
            finally:
                graph.capture_end()
        torch.cuda.current_stream(self.device).wait_stream(side)
        return graph, static_in, static_out

    def run_segment(self, pos: int, state: tuple) -> tuple:
        return self._call(("seg", pos), self.segments[pos], state)

    def run_head(self, pos: int, tap) -> HeadOutput:
        logits, conf = self._call(("head", pos), self.heads[pos], (tap,))
        if self.cuda:
            return HeadOutput(conf.float().cpu().numpy(), logits.clone(), _fetch_rows)
        return HeadOutput(conf.numpy(), logits.numpy())

    def take(self, state: tuple, rows: np.ndarray) -> tuple:
        idx = self.torch.from_numpy(np.ascontiguousarray(rows, dtype=np.int64)).to(self.device)
        return tuple(s.index_select(0, idx) for s in state)

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._graphs.clear()


def _fetch_rows(logits, rows):
    if rows is not None:
        import torch

        logits = logits.index_select(0, torch.as_tensor(np.asarray(rows), device=logits.device))
    return logits.float().cpu().numpy()
