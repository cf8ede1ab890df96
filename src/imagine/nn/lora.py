"""The LoRA update (Hu et al. 2021): beside a frozen layer W, a low-rank path B A scaled by alpha / r,
so y = W x + (alpha / r) B A x. A ("down", r x in) starts random, B ("up", out x r) at zero, so training
starts from the frozen model's output. For a convolution, A is a convolution with W's kernel, stride
and padding into r channels and B a 1x1 convolution back (kohya's LoRA for conv layers)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from imagine.nn.linear import RowwiseLinear


class LoRALayer(nn.Module):
    """The update path of one Linear or Conv2d; ``delta_weight`` is the same update as a weight."""

    def __init__(self, base: nn.Module, rank: int, alpha: float | None = None):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        self.rank = rank
        self.alpha = float(alpha if alpha is not None else rank)
        if isinstance(base, nn.Linear):
            # row by row on (B, C) inputs (a LoRA on the timestep path), as the base layer is (nn/linear.py)
            self.down = RowwiseLinear(base.in_features, rank, bias=False)
            self.up = RowwiseLinear(rank, base.out_features, bias=False)
        elif isinstance(base, nn.Conv2d):
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        else:
            raise TypeError(f"LoRA attaches to Linear and Conv2d layers, not {type(base).__name__}")
        nn.init.kaiming_uniform_(self.down.weight, a=math.sqrt(5))  # A random (as nn.Linear's own init)
        nn.init.zeros_(self.up.weight)  # B zero: the update starts at nothing

    @classmethod
    def from_tensors(cls, down: torch.Tensor, up: torch.Tensor, alpha: float | None,
                     base: nn.Module | None = None) -> LoRALayer:
        """A layer holding given A (down) and B (up) weights; ``base`` gives a conv's stride and padding
        (without it, a k x k kernel pads k // 2 with stride 1)."""
        rank = down.shape[0]
        if up.shape[1] != rank:
            raise ValueError(f"LoRA down {tuple(down.shape)} and up {tuple(up.shape)} disagree on the rank")
        if down.ndim == 2:
            shape = nn.Linear(down.shape[1], up.shape[0], device="meta")
        else:
            k = down.shape[-1]
            stride, padding = (base.stride, base.padding) if isinstance(base, nn.Conv2d) else (1, k // 2)
            shape = nn.Conv2d(down.shape[1], up.shape[0], k, stride, padding, device="meta")
        layer = cls(shape, rank, alpha).to_empty(device="cpu")
        with torch.no_grad():
            layer.down.weight.copy_(down)
            layer.up.weight.copy_(up)
        return layer

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = self.down.weight.dtype
        return self.up(self.down(x.to(dtype))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """(alpha / r) B A shaped as the base layer's weight."""
        up, down = self.up.weight, self.down.weight
        if up.ndim == 2:
            return up @ down * self.scale
        # conv: B is 1x1, so the update is B's (out, r) matrix applied to each tap of A's kernel
        return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down) * self.scale


@dataclass
class LoRA:
    layers: dict[str, LoRALayer] = field(default_factory=dict)  # "PART.MODULE" -> its update
    name: str = "lora"

    def parts(self) -> set[str]:
        return {key.split(".", 1)[0] for key in self.layers}

    def parameters(self):
        for layer in self.layers.values():
            yield from layer.parameters()

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Ours: "PART.MODULE.down.weight", ".up.weight", ".alpha"; a LyCORIS kind's tensors under their names
        (io/lora_keys.py writes kohya's, LyCORIS's and PEFT's layouts)."""
        out = {}
        for key, layer in self.layers.items():
            if isinstance(layer, WeightDelta):
                out.update({f"{key}.{name}": t for name, t in layer.tensors().items()})
            else:
                out[f"{key}.down.weight"] = layer.down.weight.detach()
                out[f"{key}.up.weight"] = layer.up.weight.detach()
            out[f"{key}.alpha"] = torch.tensor(layer.alpha)
        return out

    def trainable(self) -> dict[str, nn.Parameter]:
        """Its learning tensors by "PART.MODULE.NAME" (a trainer's optimizer and checkpoints)."""
        return {f"{key}.{name}": p for key, layer in self.layers.items() for name, p in layer.named_parameters()}


def find_module(part: nn.Module, name: str) -> nn.Module | None:
    """A module by name, with or without transformers' ``text_model.`` prefix (transformers 5 dropped it
    on CLIPTextModel; files keep it)."""
    for candidate in (name, name.removeprefix("text_model."), "text_model." + name):
        try:
            module = part.get_submodule(candidate)
        except AttributeError:
            continue
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            return module
    return None


ALGOS = ("loha", "lokr", "full", "dora", "tucker", "oft", "peft_oft", "ia3", "boft", "peft_boft")


def butterfly_permutation(size: int, blocks: int, half: int, levels: int) -> torch.Tensor:
    """BOFT's butterfly permutation (Liu et al. 2024) of ``size`` features for one level: within each of ``blocks``
    spans, the groups of ``half`` features reordered evens first, then odds, so that a block-diagonal rotation of
    blocks 2 x half acts across pairs of groups. Identity when there is one level."""
    if levels == 0:
        return torch.arange(size)
    span = size // blocks
    groups = span // half
    order = [*range(0, groups, 2), *range(1, groups, 2)]
    within = torch.cat([torch.arange(g * half, (g + 1) * half) for g in order])
    return torch.cat([within + start for start in range(0, size, span)])


def factorization(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n, a <= b and a as close to the square root as n allows (LoKr's split of a side)."""
    a = max(f for f in range(1, math.isqrt(n) + 1) if n % f == 0)
    return a, n // a


class WeightDelta(nn.Module):
    """An update given as a weight rather than a low-rank path (LyCORIS, Yeh et al. 2023; DoRA, Liu et al. 2024):

    - loha: dW = (w1a w1b) * (w2a w2b) * alpha / r, a Hadamard product of two low-rank pairs (with hada_t1/t2,
      the Tucker form for convolutions: each pair is einsum(t, wb, wa) over the kernel);
    - lokr: dW = kron(w1, w2) * scale, each factor whole or a low-rank pair (w2 may carry a Tucker core for
      convolutions); scale alpha / r where a factor is a pair, else 1 (LyCORIS's and A1111's reading);
    - full: dW = diff (and the bias moves by diff_b);
    - tucker: LoCon's CP/Tucker form for convolutions, dW[i, j] = sum_{n, m} mid[n, m] up[i, n] down[m, j] * alpha
      / r (lora_mid between a 1x1 down and up; A1111's rebuild_cp_decomposition);
    - dora: W' = m (W + s B A) / ||W + s B A||, the low-rank direction renormalized and scaled by the learned
      magnitude m (per output row, or per input column for LyCORIS's dora_scale of shape (1, in)); dW = W' - W;
    - oft (Qiu et al. 2023, kohya's and LyCORIS's layout): W's output rows in blocks, each block turned by an
      orthogonal R = (I + Q)(I - Q)^-1 of the skew-symmetric Q = B - B^T (``oft_blocks``; Q's norm clamped to
      ``options["constraint"]`` where there is one), or by R itself (LyCORIS's older ``oft_diag``): W' = R^T W
      block by block, times ``rescale`` per row where the file has it; dW = W' - W;
    - peft_oft (PEFT's OFT): the input features in blocks turned by the Cayley rotation of the skew-symmetric
      matrix whose upper triangle is ``oft_R`` (exactly, or by PEFT's Neumann series of ``options["neumann"]``
      terms): W' = W R^T;
    - boft (Liu et al. 2024, LyCORIS's butterfly OFT: ``oft_diag`` of shape (m, blocks, n, n)): the output rows
      turned by m block-diagonal rotations, the i-th acting across pairs of groups 2^i (n / 2) rows apart (the
      butterfly), each rotation given; ``rescale`` per row after;
    - peft_boft (PEFT's BOFT): the input features turned by the product of m butterfly factors P_i B_i P_i^T,
      each B_i block-diagonal Cayley rotations of (R - R^T) / 2 and P_i the butterfly permutation of its level,
      then the rows scaled by ``boft_s`` (the bias untouched): W' = s (W T^T);
    - ia3 (Liu et al. 2022, PEFT's IA3): W' = W scaled per output row by l (and the bias with it) or, for
      feed-forward layers, per input column; dW = W' - W.

    Applied as y += x dW^T (a convolution: with the base layer's stride and padding), so attaching and
    detaching stay exact, and ``delta_weight`` folds it into a weight (merging)."""

    def __init__(self, algo: str, tensors: dict[str, torch.Tensor], alpha: float | None = None,
                 trainable: bool = False, options: dict | None = None):
        super().__init__()
        if algo not in ALGOS:
            raise ValueError(f"weight update {algo!r} unknown; imagine applies {', '.join(ALGOS)}")
        self.algo = algo
        self.options = dict(options or {})  # what a kind reads beside its tensors (OFT's constraint, IA3's axis)
        self.names = sorted(tensors)
        self.trainable = trainable  # parameters that learn (train-lora --algo), else fixed buffers (a file's)
        for name, value in tensors.items():
            if trainable:
                self.register_parameter(name, nn.Parameter(value.float().clone()))
            else:
                self.register_buffer(name, value.float())
        self.rank = self._rank()
        self.alpha = float(alpha) if alpha is not None else float(self.rank or 1)
        self._cache: tuple | None = None

    @classmethod
    def new(cls, algo: str, base: nn.Module, rank: int, alpha: float | None = None) -> WeightDelta:
        """A trainable update of ``base`` that starts at nothing (dW = 0), initialized as LyCORIS does:

        - loha: both pairs random but the second pair's first factor zero;
        - lokr: W's out x in split into factors near the square root of each (a x c, b x d); the small factor
          w1 (a, c) random, the large one w2 (b, d) zero, as a low-rank pair (b, r) (r, d) with the pair's second
          factor zero when r is below half its sides, whole otherwise;
        - dora: a LoRA pair (B zero) and the magnitude m = ||W|| per output row, so W' = W at the start."""
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        weight = base.weight.detach().float()
        out, fan_in = weight.shape[0], weight[0].numel()

        def kaiming(*shape):
            t = torch.empty(*shape)
            nn.init.kaiming_uniform_(t, a=math.sqrt(5))
            return t

        if algo == "loha":
            tensors = {"hada_w1_a": torch.randn(out, rank) * 0.1, "hada_w1_b": torch.randn(rank, fan_in),
                       "hada_w2_a": torch.zeros(out, rank), "hada_w2_b": torch.randn(rank, fan_in)}
        elif algo == "lokr":
            (a, b), (c, d) = factorization(out), factorization(weight.shape[1])
            tensors = {"lokr_w1": kaiming(a, c)}
            kernel = tuple(weight.shape[2:])
            if rank < min(b, d) / 2 and not kernel:
                tensors.update(lokr_w2_a=kaiming(b, rank), lokr_w2_b=torch.zeros(rank, d))
            else:
                tensors["lokr_w2"] = torch.zeros(b, d, *kernel)
        elif algo == "dora":
            down = kaiming(rank, *weight.shape[1:])
            up = torch.zeros(out, rank, *([1] * (weight.ndim - 2)))
            norm = weight.flatten(1).norm(dim=1).reshape(out, *([1] * (weight.ndim - 1)))
            tensors = {"lora_down": down, "lora_up": up, "dora_scale": norm}
        else:
            raise ValueError(f"imagine trains LoRA, LoCon, LoHa, LoKr and DoRA; not {algo!r}")
        return cls(algo, tensors, alpha, trainable=True)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Its tensors by LyCORIS's names (io/lora_keys.py writes them with the module's kohya name)."""
        return {name: getattr(self, name).detach() for name in self.names}

    def _get(self, name: str) -> torch.Tensor | None:
        return getattr(self, name) if name in self.names else None

    def _rank(self) -> int | None:
        for name in ("hada_w1_b", "lokr_w1_b", "lokr_w2_b", "lora_down"):
            t = self._get(name)
            if t is not None:
                return t.shape[0]
        return None

    @property
    def scale(self) -> float:
        if self.algo in ("full", "oft", "peft_oft", "ia3", "boft", "peft_boft") or (
                self.algo == "lokr" and self.rank is None):
            return 1.0
        return self.alpha / (self.rank or 1)

    def _pair(self, a: str, b: str, t: str, shape: torch.Size) -> torch.Tensor:
        wa, wb, core = self._get(a), self._get(b), self._get(t)
        if core is not None:  # Tucker: (r, r, k, k) core between the two factors
            return torch.einsum("ijkl,jr,ip->prkl", core, wb.flatten(1), wa.flatten(1))
        return (wa.flatten(1) @ wb.flatten(1)).reshape(shape)

    def _oft_rotations(self) -> torch.Tensor:
        """(blocks, n, n) orthogonal matrices of an oft update."""
        if self.options.get("given"):  # LyCORIS's oft_diag: the rotations themselves
            return self._get("oft_blocks")
        blocks = self._get("oft_blocks")
        q = blocks - blocks.transpose(1, 2)
        constraint = self.options.get("constraint")
        if constraint:  # the norm of all blocks' Q together, at most the constraint
            norm = q.norm()
            if norm > constraint:
                q = q * (constraint / norm)
        eye = torch.eye(q.shape[-1], dtype=q.dtype)
        return (eye + q) @ torch.linalg.inv(eye - q)

    def _peft_rotations(self) -> torch.Tensor:
        """(blocks, n, n) of PEFT's OFT: the Cayley rotation of the skew-symmetric matrix whose upper triangle is
        each row of oft_R, exactly, or by its Neumann series (PEFT's default, 5 terms)."""
        vec = self._get("oft_R")
        n = self.options["block_size"]
        rows, cols = torch.triu_indices(n, n, 1)
        q = vec.new_zeros(vec.shape[0], n, n)
        q[:, rows, cols] = vec
        q = q - q.transpose(1, 2)
        eye = torch.eye(n, dtype=q.dtype).expand_as(q)
        terms = self.options.get("neumann")
        if not terms:
            return torch.linalg.solve(eye + q, eye - q, left=False)
        r = eye.clone()
        if terms > 1:
            r = r + 2 * q
            if terms > 2:
                power = q @ q
                r = r + 2 * power
                for _ in range(3, terms - 1):
                    power = power @ q
                    r = r + 2 * power
                r = r + power @ q
        return r

    def _butterfly(self) -> torch.Tensor:
        """PEFT BOFT's rotation of the input features: the product of its butterfly factors."""
        factors = self._get("boft_R")  # (m, blocks, n, n)
        levels, blocks, n = factors.shape[0], factors.shape[1], factors.shape[2]
        size = blocks * n
        skew = 0.5 * (factors - factors.transpose(-1, -2))
        eye = torch.eye(n, dtype=skew.dtype).expand_as(skew)
        rotations = torch.linalg.solve(eye + skew, eye - skew, left=False)
        total = torch.eye(size, dtype=skew.dtype)
        for i in range(levels):
            perm = butterfly_permutation(size, blocks // 2 ** i, n // 2, levels - 1)
            block = torch.block_diag(*rotations[i])
            total = block[perm][:, perm] @ total  # P B P^T, P the permutation's matrix (P[i, perm[i]] = 1)
        return total

    def _lycoris_butterfly(self, w: torch.Tensor) -> torch.Tensor:
        """LyCORIS's BOFT on the output rows of ``w``: at level i, rows grouped so that each block of n takes
        n / 2 rows and their partners 2^i (n / 2) rows further, turned by that level's rotations."""
        rotations = self._get("oft_blocks")  # (m, blocks, n, n), the rotations themselves
        levels, n = rotations.shape[0], rotations.shape[2]
        half = n // 2
        rest = w.shape[1:]
        x = w
        for i in range(levels):
            k = 2 ** i * half
            x = x.reshape(-1, 2, k, *rest).transpose(1, 2).reshape(w.shape)  # (c g k) -> (c k g)
            x = torch.einsum("bij,bj...->bi...", rotations[i], x.reshape(-1, n, *rest)).reshape(w.shape)
            x = x.reshape(-1, k, 2, *rest).transpose(1, 2).reshape(w.shape)  # (c k g) -> (c g k)
        return x

    def delta_weight(self, base_weight: torch.Tensor) -> torch.Tensor:
        """dW shaped as ``base_weight`` (which DoRA, OFT and IA3 read; the others only take its shape)."""
        shape = base_weight.shape
        if self.algo in ("oft", "boft"):  # LyCORIS's and kohya's: the output rows turned, then rescaled
            w = base_weight.float()
            if self.algo == "boft":
                turned = self._lycoris_butterfly(w)
            else:
                r = self._oft_rotations()
                k, n = r.shape[0], r.shape[1]
                turned = torch.einsum("knm,kn...->km...", r, w.reshape(k, n, *shape[1:])).reshape(shape)
            rescale = self._get("rescale")
            if rescale is not None:
                turned = turned * rescale.reshape(-1, *([1] * (len(shape) - 1)))
            return turned - w
        if self.algo == "peft_boft":
            w = base_weight.float().flatten(1)
            turned = (w @ self._butterfly().T) * self._get("boft_s").reshape(-1, 1)
            return (turned - w).reshape(shape)
        if self.algo == "peft_oft":
            w = base_weight.float().flatten(1)
            r = self._peft_rotations()
            blocks = w.shape[1] // r.shape[-1]
            if r.shape[0] == 1 and blocks > 1:  # block_share: one rotation for every block
                r = r.expand(blocks, -1, -1)
            turned = w @ torch.block_diag(*r).T
            return (turned - w).reshape(shape)
        if self.algo == "ia3":
            w = base_weight.float()
            scale = self._get("ia3_l").flatten()
            if self.options.get("feedforward"):  # scales the layer's input: its weight's columns
                return w * (scale - 1).reshape(1, -1, *([1] * (len(shape) - 2)))
            return w * (scale - 1).reshape(-1, *([1] * (len(shape) - 1)))
        if self.algo == "full":
            return self._get("diff").reshape(shape)
        if self.algo == "tucker":
            up, down, mid = self._get("lora_up").flatten(1), self._get("lora_down").flatten(1), self._get("lora_mid")
            return torch.einsum("nmkl,in,mj->ijkl", mid, up, down).reshape(shape) * self.scale
        if self.algo == "loha":
            return (self._pair("hada_w1_a", "hada_w1_b", "hada_t1", shape)
                    * self._pair("hada_w2_a", "hada_w2_b", "hada_t2", shape) * self.scale)
        if self.algo == "lokr":
            w1 = self._get("lokr_w1")
            if w1 is None:
                w1 = self._get("lokr_w1_a") @ self._get("lokr_w1_b")
            w2 = self._get("lokr_w2")
            if w2 is None:
                w2_shape = (shape[0] // w1.shape[0], shape[1] // w1.shape[1], *shape[2:])
                w2 = self._pair("lokr_w2_a", "lokr_w2_b", "lokr_t2", torch.Size(w2_shape))
            if w2.ndim == 4:
                w1 = w1[:, :, None, None]
            return torch.kron(w1, w2).reshape(shape) * self.scale
        # dora: the direction W + s B A, renormalized, times the magnitude
        down, up, m = self._get("lora_down"), self._get("lora_up"), self._get("dora_scale")
        w = base_weight.float()
        merged = w + (up.flatten(1) @ down.flatten(1)).reshape(shape) * self.scale
        flat = merged.flatten(1)
        if m.numel() == shape[0]:  # per output row (PEFT's magnitude vector; LyCORIS's wd_on_out)
            norm = flat.norm(dim=1).reshape(-1, *([1] * (len(shape) - 1)))
            return m.reshape(norm.shape) * merged / norm - w
        norm = flat.norm(dim=0).reshape(1, *shape[1:])  # per input column (LyCORIS's dora_scale (1, in))
        return m.reshape(norm.shape) * merged / norm - w

    def expected(self, module: nn.Module) -> str | None:
        """Why this update does not fit ``module`` (None: it fits)."""
        try:
            delta = self.delta_weight(module.weight.detach())
        except (RuntimeError, ValueError, TypeError, AttributeError) as err:
            return f"{self.algo} tensors {[tuple(getattr(self, n).shape) for n in self.names]} vs the module's " \
                   f"{tuple(module.weight.shape)} ({str(err).splitlines()[0][:80]})"
        if delta.shape != module.weight.shape:
            return f"dW {tuple(delta.shape)} vs {tuple(module.weight.shape)}"
        return None

    def _delta_for(self, module: nn.Module) -> torch.Tensor:
        if self.trainable:  # learning: the update changes every step, and gradients flow through it
            return self.delta_weight(module.weight.detach())
        key = (id(module), module.weight._version)
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.delta_weight(module.weight.detach()))
        return self._cache[1]

    def delta_bias(self, module: nn.Module) -> torch.Tensor | None:
        """How the bias moves (a full diff's diff_b; IA3 scales the bias with the output it scales)."""
        if self.algo == "ia3" and self.options.get("bias") and not self.options.get("feedforward") \
                and module.bias is not None:  # PEFT's scales the output, bias included
            return module.bias.detach().float() * (self._get("ia3_l").flatten() - 1)
        if self.algo in ("oft", "boft", "peft_boft"):  # the bias is neither turned nor scaled
            return None
        return self._get("diff_b")

    def forward(self, x: torch.Tensor, module: nn.Module) -> torch.Tensor:
        delta = self._delta_for(module).to(x.dtype)
        bias = self.delta_bias(module)
        bias = bias.to(x.dtype) if bias is not None else None
        if isinstance(module, nn.Conv2d):
            return torch.nn.functional.conv2d(x, delta, bias, module.stride, module.padding, module.dilation,
                                              module.groups)
        return torch.nn.functional.linear(x, delta, bias)
