"""The demo's stochastic task: a sparse hidden Markov model whose data distribution p_data(y|x) is known exactly.

Why an HMM: SPIN claims to move p_theta toward p_data; that is a number only if p_data is known. An HMM gives
    - exact likelihoods by the forward algorithm (O(T S^2)), hence exact log p_data(y|x) of any string;
    - many valid answers per prompt (a distribution, not one right answer: the SFT target is one sample of it,
      like a human answer), and a clear notion of validity: p_data(y|x) > 0 (emission and transition supports
      are sparse, so most strings are invalid);
    - a prompt that conditions the answer: x is the first P emitted letters, y their continuation, so the hidden
      state after x (the forward posterior) is what y depends on.
It is built procedurally from a seed in milliseconds; no data files.

Generative process (a string z = x y of letters, P = prompt_len <= |z| <= L = max_len):
    h ~ pi; repeat: stop with probability stop_t(h) (t = letters so far), else emit z_{t+1} ~ E[h], h ~ T[h];
    stop_t(s) = 0 for t <= P (so |y| >= 1), 1 for t = L, q[s] otherwise.
With alpha_t(s) = P(z_1..z_t, not stopped, next state s), by the forward algorithm
    alpha_0 = pi,   alpha_t(s') = sum_s alpha_{t-1}(s) (1 - stop_{t-1}(s)) E[s, z_t] T[s, s']
    p_data(y | x) = (alpha_n . stop_n) / sum_s alpha_P(s)            (n = |x y|)
Summed over every y of 1..L-P letters, p_data(y|x) = 1 exactly (tests enumerate it on a tiny instance).
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass

import numpy as np

LETTERS = "abcdefghijkl"


@dataclass
class HMM:
    pi: np.ndarray        # (S,)   initial state distribution
    T: np.ndarray         # (S, S) transitions, rows sum to 1 (sparse)
    E: np.ndarray         # (S, V) emissions, rows sum to 1 (sparse)
    q: np.ndarray         # (S,)   stop probability once stopping is allowed
    prompt_len: int       # P: |x|
    max_len: int          # L: |x y| <= L (stop forced there)
    letters: str          # V letters, the alphabet of x and y

    @property
    def max_answer_len(self) -> int:
        return self.max_len - self.prompt_len

    def _stop(self, t: int) -> np.ndarray:
        """(S,) probability of stopping after t letters, by the state about to emit letter t+1."""
        if t <= self.prompt_len:
            return np.zeros_like(self.q)
        if t >= self.max_len:
            return np.ones_like(self.q)
        return self.q

    def _ids(self, s: str) -> list[int] | None:
        idx = [self.letters.find(c) for c in s]
        return None if any(i < 0 for i in idx) else idx

    def _forward(self, ids: list[int], t0: int = 0, alpha: np.ndarray | None = None) -> np.ndarray:
        a = self.pi.copy() if alpha is None else alpha
        for k, v in enumerate(ids):
            a = ((a * (1.0 - self._stop(t0 + k)) * self.E[:, v]) @ self.T)              # (S,)
        return a

    def logp(self, x: str, y: str) -> float:
        """log p_data(y | x) exactly (-inf if y is invalid: a letter outside the alphabet, empty, too long, or
        probability 0 under the model). x must be a valid prompt of prompt_len letters."""
        xi, yi = self._ids(x), self._ids(y)
        if xi is None or len(xi) != self.prompt_len:
            raise ValueError(f"not a prompt of {self.prompt_len} letters from {self.letters!r}: {x!r}")
        ax = self._forward(xi)
        px = ax.sum()
        if px <= 0:
            raise ValueError(f"prompt {x!r} has probability 0")
        if yi is None or not 1 <= len(yi) <= self.max_answer_len:
            return -math.inf
        a = self._forward(yi, self.prompt_len, ax / px)                                  # normalised: p(.|x)
        p = float(a @ self._stop(self.prompt_len + len(yi)))
        return math.log(p) if p > 0 else -math.inf

    def sample(self, rng: np.random.Generator, x: str | None = None) -> str:
        """One string: x y ~ p_data when x is None, else y ~ p_data(. | x) (returns y only)."""
        S = len(self.pi)
        if x is None:
            h, out = rng.choice(S, p=self.pi), []
        else:
            a = self._forward(self._ids(x))
            h, out = rng.choice(S, p=a / a.sum()), list(x)   # h: the state about to emit letter P+1 (posterior)
        while True:
            t = len(out)
            if rng.random() < self._stop(t)[h]:
                break
            out.append(self.letters[rng.choice(len(self.letters), p=self.E[h])])
            h = rng.choice(S, p=self.T[h])
        s = "".join(out)
        return s if x is None else s[len(x):]


def make_hmm(seed: int, *, states: int = 8, vocab: int = 10, emit_support: int = 3, trans_support: int = 3,
             prompt_len: int = 5, max_len: int = 13, stop: tuple[float, float] = (0.15, 0.4),
             concentration: float = 1.0) -> HMM:
    """A random sparse HMM: each state emits `emit_support` of the `vocab` letters and moves to `trans_support`
    states, with Dirichlet(concentration) probabilities on the support; pi is Dirichlet over all states."""
    if not 1 <= emit_support <= vocab <= len(LETTERS):
        raise ValueError(f"need 1 <= emit_support <= vocab <= {len(LETTERS)}")
    if not 1 <= trans_support <= states or not 1 <= prompt_len < max_len:
        raise ValueError("need 1 <= trans_support <= states and 1 <= prompt_len < max_len")
    rng = np.random.default_rng(int.from_bytes(hashlib.sha256(f"spin_fast.hmm/{seed}".encode()).digest()[:8],
                                               "little"))
    def sparse_rows(n_rows, n_cols, k):
        m = np.zeros((n_rows, n_cols))
        for r in range(n_rows):
            cols = rng.choice(n_cols, size=k, replace=False)
            m[r, cols] = rng.dirichlet(np.full(k, concentration))
        return m
    return HMM(pi=rng.dirichlet(np.ones(states)), T=sparse_rows(states, states, trans_support),
               E=sparse_rows(states, vocab, emit_support), q=rng.uniform(*stop, size=states),
               prompt_len=prompt_len, max_len=max_len, letters=LETTERS[:vocab])


def make_rows(hmm: HMM, n: int, seed: int) -> list[dict]:
    """n rows in the ultrachat schema with distinct prompts x ~ p_data (first prompt_len letters) and one answer
    y ~ p_data(.|x) each (the "human" answer). Deterministic in (hmm, n, seed)."""
    from .demo import _row
    rng = np.random.default_rng(seed)
    rows, seen, tries = [], set(), 0
    while len(rows) < n:
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"the HMM has too few distinct prompts for n={n} (found {len(rows)})")
        x = hmm.sample(rng)[:hmm.prompt_len]
        if x in seen:
            continue
        seen.add(x)
        rows.append(_row(x, hmm.sample(rng, x)))
    return rows


# ---- estimators -------------------------------------------------------------------------------------------------

def mean_se(values) -> tuple[float, float]:
    """(mean, standard error of the mean) of finite values (nan, nan when none)."""
    v = np.asarray([x for x in values if math.isfinite(x)], dtype=np.float64)
    if v.size == 0:
        return math.nan, math.nan
    return float(v.mean()), float(v.std(ddof=1) / math.sqrt(v.size)) if v.size > 1 else math.nan


def distribution_metrics(data_on_data, theta_on_data, data_on_theta, theta_on_theta) -> dict:
    """The per-iteration distances from Monte Carlo samples (lists of log-probs, one per sample):
    data_on_data / theta_on_data: log p_data(y|x) and log p_theta(y|x) for y ~ p_data(.|x);
    data_on_theta / theta_on_theta: the same for y ~ p_theta(.|x) (log p_data = -inf for an invalid y).

        forward_kl = E_{p_data}[log p_data - log p_theta]  (coverage; finite since p_theta > 0 everywhere)
        coverage   = E_{p_data}[log p_theta]
        quality    = E_{p_theta}[log p_data | valid],  validity = P_{p_theta}(p_data(y|x) > 0)
        reverse_kl_valid = KL(p_theta(.|valid) || p_data) = E_{p_theta}[log p_theta - log p_data | valid] - log validity
    The plain reverse KL is +inf as soon as p_theta puts mass on an invalid y, so its finite part is reported for
    p_theta renormalised on the valid set, next to the validity rate. Every mean comes with its standard error."""
    fk = [a - b for a, b in zip(data_on_data, theta_on_data)]
    valid = [math.isfinite(d) for d in data_on_theta]
    n_valid = sum(valid)
    validity = n_valid / max(len(valid), 1)
    rk = [t - d for t, d, ok in zip(theta_on_theta, data_on_theta, valid) if ok]
    fk_m, fk_se = mean_se(fk)
    cov_m, cov_se = mean_se(theta_on_data)
    q_m, q_se = mean_se([d for d in data_on_theta if math.isfinite(d)])
    rk_m, rk_se = mean_se(rk)
    return {"forward_kl": fk_m, "forward_kl_se": fk_se, "coverage": cov_m, "coverage_se": cov_se,
            "quality": q_m, "quality_se": q_se, "validity": validity,
            "validity_se": math.sqrt(validity * (1 - validity) / max(len(valid), 1)),
            "reverse_kl_valid": (rk_m - math.log(validity)) if n_valid else math.nan, "reverse_kl_valid_se": rk_se,
            "data_entropy": -mean_se(data_on_data)[0], "n_data_samples": len(fk), "n_model_samples": len(valid)}


def response_logps(model, tokenizer, prompts: list[str], responses: list[str], batch: int = 256) -> list[float]:
    """log p_theta(response + end of turn | prompt) under the chat template, summed over the response tokens
    (what SPIN's loss scores). model: a spin_fast Transformer."""
    import torch
    from .chat import render_prompt_response
    out = []
    dev = next(model.parameters()).device
    for i in range(0, len(prompts), batch):
        ids, plens, lens = [], [], []
        for p, r in zip(prompts[i:i + batch], responses[i:i + batch]):
            s, pl = render_prompt_response(tokenizer, [{"role": "user", "content": p}], r)
            ids += s
            plens.append(pl)
            lens.append(len(s))
        cu = torch.tensor(np.concatenate([[0], np.cumsum(lens)]), dtype=torch.int32, device=dev)
        pos = torch.cat([torch.arange(n, device=dev) for n in lens])
        x = torch.tensor(ids, device=dev)
        with torch.no_grad():
            lp = torch.log_softmax(model.logits(model(x, pos, cu, max(lens))).float(), -1)   # (N, V)
            tok_lp = torch.zeros(len(ids), dtype=torch.float64)
            tok_lp[:-1] = lp[:-1].gather(1, x[1:, None])[:, 0].double().cpu()     # log p(token n+1 | <= n)
        for k, (start, pl, n) in enumerate(zip(cu[:-1].tolist(), plens, lens)):
            out.append(float(tok_lp[start + pl - 1:start + n - 1].sum()))          # response tokens pl..n-1
    return out
