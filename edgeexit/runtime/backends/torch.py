"""PyTorch backend: eager on CPU; on CUDA each unit is replayed from a CUDA graph per batch bucket.

Rebuilds the network from the artifact's ``weights.pt`` (loaded with ``weights_only=True``).

CUDA graphs: batch sizes are padded up to a power of two (rows are independent; outputs
are sliced back), so a unit has at most 7 graphs for batch 1..64, and every graph is captured
into ONE memory pool (``torch.cuda.graph_pool_handle()``), not a private pool each. Sharing a
pool is only safe for memory that is dead between replays, so a graph's outputs are not left in
the pool: they are allocated before capture, and the graph's last kernels copy its results into
them. The pool then holds intermediates only, which any replay order may reuse.
"""

from __future__ import annotations

import numpy as np

from edgeexit.errors import ArtifactError
from edgeexit.runtime.artifact import Artifact, artifact_file
from edgeexit.runtime.backends.base import GraphStats, HeadOutput, Runner, RunnerInfo
from edgeexit.runtime.device import cpu_name
from edgeexit.runtime.plan import head_name, segment_name


class TorchBackend(Runner):
    def __init__(
        self,
        artifact: Artifact,
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
        from edgeexit.runtime.artifact import check_weights_config
        from edgeexit.util import load_untrusted

        self.torch = torch
        path = artifact.weights or artifact_file(artifact.folder, "weights.pt")
        if not path.is_file():
            raise ArtifactError(f"{path} is missing: the torch backend needs the weights; re-export the model")
        blob = load_untrusted(path, "weights file")
        check_weights_config(artifact.model.config, blob, path)  # before anything is built from it
        model = build_model(MultiExitConfig.from_dict(blob["config"]))
        model.load_state_dict(blob["state_dict"])
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.eval().to(self.device)
        self.cuda = self.device.type == "cuda"
        self.use_graphs = cuda_graphs and self.cuda
        self.max_graphs = max_graphs
        self._graphs: dict = {}
        self._graph_failed: dict = {}  # unit key -> the batch bucket whose capture failed (then eager always)
        # Captured graphs share static buffers and a memory pool: one caller at a time on CUDA (the
        # Cascade serialises callers of a runner that is not thread safe).
        self.thread_safe = not self.use_graphs
        self._pool = None  # the graph memory pool every capture shares, made at the first capture
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
            n = int(inputs[0].shape[0])
            b = bucket(n)
            gkey = (key, b)
            entry = self._graphs.get(gkey)
            if entry is None:
                if len(self._graphs) >= self.max_graphs:
                    return tuple(fn(*inputs))
                padded = tuple(torch.cat([t, t.new_zeros((b - n, *t.shape[1:]))]) if b > n else t for t in inputs)
                try:
                    entry = self._capture(fn, padded)
                except RuntimeError:
                    # Capture is an optimisation: fall back to eager for this unit.
                    self._graph_failed[key] = b
                    return tuple(fn(*inputs))
                self._graphs[gkey] = entry
            graph, static_in, static_out = entry
            for dst, src in zip(static_in, inputs, strict=True):
                dst[:n].copy_(src)  # rows n..b keep older values: rows are independent
            graph.replay()
            return tuple(o[:n] for o in static_out)

    def _capture(self, fn, inputs):
        torch = self.torch
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        static_in = tuple(t.clone() for t in inputs)
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(3):  # warm-up (cuDNN autotuning, allocator) outside the capture
                warm = tuple(fn(*static_in))
            static_out = tuple(torch.empty_like(o) for o in warm)  # outside the pool: see the module doc
            del warm
            graph = torch.cuda.CUDAGraph()
            # capture_begin/capture_end rather than torch.cuda.graph(): that context manager
            # synchronises the device and empties the allocator's cache for every new (unit, batch)
            # capture. "thread_local": CUDA work of other threads cannot invalidate this capture.
            graph.capture_begin(pool=self._pool, capture_error_mode="thread_local")
            try:
                for dst, src in zip(static_out, fn(*static_in), strict=True):
                    dst.copy_(src)
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

    def graph_stats(self) -> GraphStats:
        """The CUDA graphs captured so far, per (unit name, batch bucket), and the failed captures
        (a unit whose capture failed runs eagerly from then on)."""
        captured = {(_unit_name(key), b): 1 for key, b in list(self._graphs)}  # copies: another thread may capture
        failed = {(_unit_name(key), b): 1 for key, b in list(self._graph_failed.items())}
        return GraphStats.of(captured, failed, self.max_graphs)

    def synchronize(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize(self.device)

    def close(self) -> None:
        self._graphs.clear()
        self._pool = None


def _unit_name(key: tuple) -> str:
    kind, pos = key
    return segment_name(pos) if kind == "seg" else head_name(pos)


def bucket(n: int) -> int:
    """The batch a graph is captured for: the next power of two."""
    return 1 << (int(n) - 1).bit_length()


def _fetch_rows(logits, rows):
    if rows is not None:
        import torch

        logits = logits.index_select(0, torch.as_tensor(np.asarray(rows), device=logits.device))
    return logits.float().cpu().numpy()
