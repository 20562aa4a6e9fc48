"""The JAX peer (run with the Python of its own venv, /work/venvs/jax): one jitted step per
mini-batch with Adam written out as optax does it, parameters and moments donated to the
step, mini-batches placed on the device beforehand. The loss of the last step is read back
at the end of a round, so JAX keeps its asynchronous dispatch (the strongest form of it)."""
from __future__ import annotations

import os

import protocol
from protocol import NotAvailable

STATE: dict = {}


def init_dense(rng, n_in, n_out):
    import numpy as np
    w = rng.normal(0.0, np.sqrt(2.0 / n_in), size=(n_in, n_out)).astype(np.float32)
    return {"w": w, "b": np.zeros(n_out, np.float32)}


def build(request):
    import numpy as np
    import jax
    import jax.numpy as jnp
    rng = np.random.default_rng(0)
    model, arch = request["model"], request.get("arch") or {}
    if model == "mlp":
        sizes = [arch["input"]] + [u for u, _ in arch["layers"]]
        acts = [a for _, a in arch["layers"]]
        params = [init_dense(rng, a, b) for a, b in zip(sizes[:-1], sizes[1:])]

        def forward(params, x):
            for layer, act in zip(params, acts):
                x = x @ layer["w"] + layer["b"]
                if act == "relu":
                    x = jax.nn.relu(x)
                elif act == "tanh":
                    x = jnp.tanh(x)
            return x
        return params, forward, (arch["input"],), sizes[-1]
    if model == "lenet5":
        def conv_init(out_c, in_c, k):
            w = rng.normal(0.0, np.sqrt(2.0 / (in_c * k * k)), size=(out_c, in_c, k, k)).astype(np.float32)
            return {"w": w, "b": np.zeros(out_c, np.float32)}
        params = [conv_init(6, 1, 5), conv_init(16, 6, 5), init_dense(rng, 400, 120),
                  init_dense(rng, 120, 84), init_dense(rng, 84, 10)]

        def conv(x, p, pad):
            y = jax.lax.conv_general_dilated(x, p["w"], (1, 1), [(pad, pad), (pad, pad)],
                                             dimension_numbers=("NCHW", "OIHW", "NCHW"))
            return jax.nn.relu(y + p["b"][None, :, None, None])

        def pool(x):
            return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")

        def forward(params, x):
            x = pool(conv(x, params[0], 2))
            x = pool(conv(x, params[1], 0))
            x = x.reshape(x.shape[0], -1)
            x = jax.nn.relu(x @ params[2]["w"] + params[2]["b"])
            x = jax.nn.relu(x @ params[3]["w"] + params[3]["b"])
            return x @ params[4]["w"] + params[4]["b"]
        return params, forward, (1, 28, 28), 10
    if model == "gru_char":
        vocab, embed, hidden = arch.get("vocab", 64), arch.get("embed", 32), arch.get("hidden", 128)
        scale = np.sqrt(1.0 / hidden)
        params = {"embed": rng.normal(size=(vocab, embed)).astype(np.float32),
                  "wi": rng.uniform(-scale, scale, (embed, 3 * hidden)).astype(np.float32),
                  "wh": rng.uniform(-scale, scale, (hidden, 3 * hidden)).astype(np.float32),
                  "bi": np.zeros(3 * hidden, np.float32), "bh": np.zeros(3 * hidden, np.float32),
                  "out": init_dense(rng, hidden, vocab)}

        def forward(params, x):
            e = params["embed"][x]                                  # (N, T, E)
            gi = e @ params["wi"] + params["bi"]                   # input projections, all steps

            def cell(h, gi_t):
                gh = h @ params["wh"] + params["bh"]
                ir, iz, inn = jnp.split(gi_t, 3, axis=-1)
                hr, hz, hn = jnp.split(gh, 3, axis=-1)
                r, z = jax.nn.sigmoid(ir + hr), jax.nn.sigmoid(iz + hz)
                n = jnp.tanh(inn + r * hn)
                h = (1 - z) * n + z * h
                return h, h
            h0 = jnp.zeros((x.shape[0], hidden), jnp.float32)
            _, hs = jax.lax.scan(cell, h0, jnp.swapaxes(gi, 0, 1))
            hs = jnp.swapaxes(hs, 0, 1)                             # (N, T, H)
            return (hs @ params["out"]["w"] + params["out"]["b"]).reshape(-1, vocab)
        return params, forward, None, vocab
    raise NotAvailable(f"no JAX model for {model}")


def setup(request):
    threads = int(request["threads"])
    os.environ.setdefault("XLA_FLAGS", f"--xla_cpu_multi_thread_eigen=true intra_op_parallelism_threads={threads}")
    on_gpu = request.get("device") == "cuda"
    if on_gpu:      # the GPU's memory as needed, not 75 % of it up front: the other peers share it
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
    import jax
    import jax.numpy as jnp
    if on_gpu != (jax.default_backend() == "gpu"):
        raise NotAvailable(f"--device {request.get('device', 'cpu')}: this JAX runs on {jax.default_backend()}")
    batch = int(request["batch"])
    params, forward, features, classes = build(request)
    if features is None:
        xs, ys = protocol.synthetic_tokens(batch, int(request.get("arch", {}).get("steps", 32)), classes)
    else:
        xs, ys = protocol.synthetic_classification(batch, features, classes)
    batches = [(jnp.asarray(xs[i]), jnp.asarray(ys[i].reshape(-1))) for i in range(len(xs))]
    lr, b1, b2, eps = 1e-3, 0.9, 0.999, 1e-8

    def loss_fn(p, x, y):
        logits = forward(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    def train_step(p, m, v, t, x, y):
        loss, g = jax.value_and_grad(loss_fn)(p, x, y)
        t = t + 1
        m = jax.tree_util.tree_map(lambda m, g: b1 * m + (1 - b1) * g, m, g)
        v = jax.tree_util.tree_map(lambda v, g: b2 * v + (1 - b2) * g * g, v, g)
        step = lr * jnp.sqrt(1 - b2 ** t) / (1 - b1 ** t)
        p = jax.tree_util.tree_map(lambda p, m, v: p - step * m / (jnp.sqrt(v) + eps), p, m, v)
        return p, m, v, t, loss

    step_fn = jax.jit(train_step, donate_argnums=(0, 1, 2, 3))
    p = jax.tree_util.tree_map(jnp.asarray, params)
    zeros = lambda: jax.tree_util.tree_map(jnp.zeros_like, p)
    state = {"p": p, "m": zeros(), "v": zeros(), "t": jnp.asarray(0.0, jnp.float32)}
    STATE.update(forward=jax.jit(lambda p, x: jax.nn.softmax(forward(p, x))), state=state, xs=xs, jnp=jnp)

    sync = bool(request.get("sync_every_step"))          # read the loss back every step, as dlnc does

    def step(n: int) -> float:
        loss = None
        for i in range(n):
            x, y = batches[i % len(batches)]
            state["p"], state["m"], state["v"], state["t"], loss = step_fn(
                state["p"], state["m"], state["v"], state["t"], x, y)
            if sync:
                float(loss)
        return float(loss)

    return step, {"version": jax.__version__, "devices": str(jax.devices())}


def infer(batch: int):
    jnp, xs = STATE["jnp"], STATE["xs"]
    flat = xs.reshape(-1, *xs.shape[2:])
    import numpy as np
    x = jnp.asarray(np.resize(flat, (batch, *flat.shape[1:])))
    fwd, state = STATE["forward"], STATE["state"]
    return lambda: fwd(state["p"], x).block_until_ready()


if __name__ == "__main__":
    protocol.serve(setup, infer)
