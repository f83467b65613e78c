"""The one way an op of `uno_engine.ops` is registered: a torch custom op with an eager fast path.

    from uno_engine.ops._register import custom_op

    @custom_op("uno_engine::my_op_bwd", fake=_bwd_fake)
    def my_op_bwd(grad: torch.Tensor, x: torch.Tensor, scale: float) -> torch.Tensor:
        ...                                      # launches the kernel (or the torch path)

    @custom_op("uno_engine::my_op", fake=_fwd_fake)
    def my_op(x: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        ...

    def _setup_context(ctx, inputs, output): ...         # as torch.library.register_autograd's
    def _backward(ctx, grad_out, grad_aux):              # one gradient per input (None: none)
        return my_op_bwd(grad_out, ctx.saved_tensors[0], ctx.scale), None

    my_op.register_autograd(_backward, setup_context=_setup_context)

    y, aux = my_op(x, 2.0)

`custom_op` makes a real operator (`torch.library.custom_op`: schema from the annotations, `register_fake`,
`register_autograd`), so torch.compile / export trace it as one node (no graph break) and
`torch.library.opcheck` checks it. Calling the returned `Op`:
- under torch.compile / export, or with any tensor argument that is not a plain `torch.Tensor` (fake,
  functional or other subclass tensors: AOTAutograd tracing a backward, FakeTensorMode): the operator
  `torch.ops.<ns>.<name>.default`;
- in eager with a gradient to record: `_EagerFunction.apply`, a plain autograd.Function that calls the same
  implementation and the same setup_context / backward, without the dispatcher and the custom op's generic
  autograd adapter (which fills defaults from the schema and pytree-flattens every argument on each call);
- in eager without a gradient: the implementation itself.
So a backward that calls another `Op` (the backward kernel) is an operator node under tracing and a plain
call in eager. Both paths run the same code; only dispatch differs.

Lists of tensors (`list[torch.Tensor]` arguments and results) are flattened for the eager autograd.Function
the way torch's adapter does it: `ctx.needs_input_grad` has a list of bools at a tensor-list argument, and
the backward returns a list (or None) there, and receives a list of gradients for a tensor-list result.

Caveat of the eager fast path: a TorchDispatchMode active around plain tensors (e.g. a FLOP counter) sees
the ops inside the implementation, not the custom op.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

__all__ = ["Op", "custom_op"]


class Op:
    """A registered custom op (see the module docstring). Attributes: `overload` (the OpOverload, e.g. for
    `torch.library.opcheck`), `impl` (the Python implementation), `qualname`."""

    def __init__(self, qualname: str, impl: Callable, fake: Callable, schema: str | None = None):
        self.qualname = qualname
        self.impl = impl
        self._custom = torch.library.custom_op(qualname, impl, mutates_args=(), schema=schema)
        self._custom.register_fake(fake)
        ns, name = qualname.split("::")
        self.overload = getattr(getattr(torch.ops, ns), name).default
        schema_ = self.overload._schema
        self._list_args = tuple(i for i, a in enumerate(schema_.arguments) if _is_tensor_list(a.type))
        self._tensor_args = tuple(
            i for i, a in enumerate(schema_.arguments) if str(a.type) in ("Tensor", "Optional[Tensor]")
        )
        self._list_outs = tuple(i for i, r in enumerate(schema_.returns) if _is_tensor_list(r.type))
        self._tuple_out = len(schema_.returns) != 1
        self._backward: Callable | None = None
        self._setup_context: Callable | None = None
        self.__name__ = name
        self.__doc__ = impl.__doc__

    def register_autograd(self, backward: Callable, *, setup_context: Callable) -> None:
        """As `torch.library.register_autograd`; also used by the eager path."""
        self._custom.register_autograd(backward, setup_context=setup_context)
        self._backward, self._setup_context = backward, setup_context

    def __call__(self, *args):
        if torch.compiler.is_compiling():
            return self.overload(*args)
        grad = False
        for i in self._tensor_args:
            a = args[i]
            if a is not None:
                if type(a) not in _PLAIN:
                    return self.overload(*args)
                grad = grad or a.requires_grad
        list_grad = False
        for i in self._list_args:
            a = args[i]
            if a and type(a[0]) not in _PLAIN:
                return self.overload(*args)
            if not list_grad and self._backward is not None:
                for x in a:
                    if x.requires_grad:
                        list_grad = True
                        break
        if (grad or list_grad) and self._backward is not None and torch.is_grad_enabled():
            if not list_grad and not self._list_outs:
                # tensor lists with no grad ride along as plain objects: no flattening
                return _EagerFunction.apply(*args, self)
            return self._apply_flat(args)
        return self.impl(*args)

    def __repr__(self) -> str:
        return f"Op({self.qualname!r})"

    # ------------------------------------------------------------------ tensor lists on the eager path
    def _apply_flat(self, args):
        flat, lengths = _flatten(args, self._list_args)
        meta = _FlatMeta(self, lengths, len(args))
        out = _EagerFlatFunction.apply(*flat, meta)
        return meta.unflatten_outputs(out if isinstance(out, tuple) else (out,))


def custom_op(qualname: str, *, fake: Callable, schema: str | None = None) -> Callable[[Callable], Op]:
    """Decorator: register `impl` as the custom op `qualname` ("namespace::name", no mutated arguments) with
    the fake (meta) implementation `fake`; returns its `Op`. `schema` overrides the one inferred from the
    annotations."""

    def wrap(impl: Callable) -> Op:
        return Op(qualname, impl, fake, schema)

    return wrap


def _flatten(items, list_positions: tuple) -> tuple[tuple, tuple]:
    """(flat, lengths): `items` with the lists at `list_positions` spliced in, and those lists' lengths."""
    flat, lengths = [], []
    for i, x in enumerate(items):
        if i in list_positions:
            flat.extend(x)
            lengths.append(len(x))
        else:
            flat.append(x)
    return tuple(flat), tuple(lengths)


def _unflatten(flat, n: int, list_positions: tuple, lengths: tuple) -> list:
    """Inverse of `_flatten`: `n` items, a list of lengths[k] items at the k-th of `list_positions`."""
    items, pos, k = [], 0, 0
    for i in range(n):
        if i in list_positions:
            m = lengths[k]
            k += 1
            items.append(list(flat[pos : pos + m]))
            pos += m
        else:
            items.append(flat[pos])
            pos += 1
    return items


def _is_tensor_list(t) -> bool:
    text = str(t)
    return text.startswith("List[") and "Tensor" in text


# plain tensors take the eager path; any subclass (fake, functional, ...) the operator. The first tensor of a
# list stands for the list (a traced call passes subclass tensors throughout).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


class _EagerFunction(torch.autograd.Function):
    """Eager autograd of an `Op` whose tensor lists (if any) need no gradient and whose results hold no
    list: apply(*args, op). A tensor-list argument is a plain object to autograd here; the backward sees
    a list of False in needs_input_grad there, and whatever it returns there is dropped."""

    @staticmethod
    def forward(ctx, *args):
        op, args = args[-1], args[:-1]
        out = op.impl(*args)
        op._setup_context(ctx, args, out)
        ctx._uno_op = op
        if op._list_args:
            ctx._uno_lens = tuple(len(args[i]) for i in op._list_args)
        return out

    @staticmethod
    def backward(ctx, *grads):
        op = ctx._uno_op
        prev = ctx.needs_input_grad
        needs = prev[:-1]
        if op._list_args:
            needs = list(needs)
            for i, n in zip(op._list_args, ctx._uno_lens, strict=True):
                needs[i] = [False] * n
            needs = tuple(needs)
        try:
            ctx.needs_input_grad = needs
            res = op._backward(ctx, *grads)
        finally:
            ctx.needs_input_grad = prev
        if not op._list_args:
            return (*res, None) if isinstance(res, tuple) else (res, None)
        res = list(res) if isinstance(res, tuple) else [res]
        for i in op._list_args:
            res[i] = None
        res.append(None)
        return tuple(res)


class _FlatMeta:
    """How the flat inputs / outputs of `_EagerFlatFunction` map to the op's arguments and results."""

    __slots__ = ("op", "lengths", "n_args", "out_lengths")

    def __init__(self, op: Op, lengths: tuple, n_args: int):
        self.op, self.lengths, self.n_args = op, lengths, n_args
        self.out_lengths: tuple = ()

    def unflatten_args(self, flat):
        return _unflatten(flat, self.n_args, self.op._list_args, self.lengths)

    def flatten_outputs(self, out) -> tuple:
        flat, self.out_lengths = _flatten(out if self.op._tuple_out else (out,), self.op._list_outs)
        return flat

    def unflatten_outputs(self, flat):
        n_out = len(self.op.overload._schema.returns)
        outs = _unflatten(flat, n_out, self.op._list_outs, self.out_lengths)
        return tuple(outs) if self.op._tuple_out else outs[0]

    def flatten_grads(self, grads) -> tuple:
        flat = []
        for i, g in enumerate(grads):
            if i in self.op._list_args:
                n = self.lengths[self.op._list_args.index(i)]
                flat.extend(g if g is not None else [None] * n)
            else:
                flat.append(g)
        return tuple(flat)


class _EagerFlatFunction(torch.autograd.Function):
    """Eager autograd of an `Op` with tensor-list arguments or results: apply(*flat_args, meta)."""

    @staticmethod
    def forward(ctx, *flat):
        meta = flat[-1]
        args = meta.unflatten_args(flat[:-1])
        out = meta.op.impl(*args)
        meta.op._setup_context(ctx, tuple(args), out)
        ctx._uno_meta = meta
        return meta.flatten_outputs(out)

    @staticmethod
    def backward(ctx, *flat_grads):
        meta = ctx._uno_meta
        grads = meta.unflatten_outputs(flat_grads)
        prev = ctx.needs_input_grad
        try:
            ctx.needs_input_grad = tuple(meta.unflatten_args(prev[:-1]))
            res = meta.op._backward(ctx, *(grads if meta.op._tuple_out else (grads,)))
        finally:
            ctx.needs_input_grad = prev
        if not isinstance(res, tuple):
            res = (res,)
        return (*meta.flatten_grads(res), None)
