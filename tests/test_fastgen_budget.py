"""The budget profile (fastgen/budget.py): option recoveries against sets built by hand, the allocation against
uniform allocations and exhaustive search, stores with per-head ratios against dense masked attention, and the kept
fraction on the real model."""
import itertools

import pytest
import torch
from test_fastgen_model import book_prompt, engine  # noqa: F401  (the real-model fixture)
from test_fastgen_store import L0, one_thread, resident, run  # noqa: F401  (one_thread: an autouse fixture)

import tinygen.fastgen.allocate as allocation
import tinygen.fastgen.budget as budget
from conftest import DEVICES, kept_set
from tinygen.cache import kept_fraction
from tinygen.fastgen.allocate import allocate
from tinygen.fastgen.budget import MENU, Option, option_recoveries, rank_key
from tinygen.fastgen.cache import fastgen_caches
from tinygen.fastgen.kinds import TokenKinds, vocab_kinds
from tinygen.fastgen.policy import FREQUENT, FULL, LOCAL, SHAPES, FastGenConfig
from tinygen.generate import generate


def observation_map(heads, L, rows, seed):
    """Random causal attention (heads, L, L) with peaked rows, and the column sums of its last `rows` rows."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(heads, L, L, generator=g) * 3
    scores = scores.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
    attn = torch.softmax(scores, -1)
    return attn, attn[:, L - rows :].sum(1)


@pytest.mark.parametrize("L,rows", [(37, 10), (64, 64), (9, 1)])
def test_option_recoveries_equal_the_attention_on_the_kept_sets(L, rows):
    attn, obs = observation_map(3, L, rows, seed=L)
    rec = option_recoveries(obs, L - rows)
    key = rank_key(obs, L - rows)
    for h in range(3):
        for i, o in enumerate(MENU):
            keep = kept_set(o, key[h], L)
            direct = float(attn[h, L - rows :][:, keep].sum(1).mean())  # mean over observation rows of kept mass
            assert rec[h, i] == pytest.approx(direct, abs=1e-5), (h, o)


def test_option_recoveries_hand_case():
    # 4 keys, 2 observation rows (rows 2 and 3): row 2 = [.5 .1 .4 0], row 3 = [.6 .1 .1 .2]
    obs = torch.tensor([[1.1, 0.2, 0.5, 0.2]])
    # ranking: mean per row that saw the key: [.55 .1 .25 .2] (key 3 was seen by row 3 only)
    menu = (Option(FREQUENT, 0, 0.25), Option(FREQUENT, 0, 0.5), Option(LOCAL | FREQUENT, 0.25, 0.25), Option(FULL))
    rec = option_recoveries(obs, 2, menu)
    # f25 keeps key 0: 1.1/2; f50 keys 0, 2: 1.6/2; h50 window {3} + key 0: 1.3/2
    torch.testing.assert_close(rec, torch.tensor([[0.55, 0.8, 0.65, 1.0]]))


def test_allocation_meets_the_target_and_beats_every_uniform_allocation():
    g = torch.Generator().manual_seed(0)
    L = 200
    cost = torch.tensor([o.kept(L) / L for o in MENU], dtype=torch.float64)
    # concave-ish recovery curves of different steepness per head, as heads have
    steep = torch.rand(60, 1, generator=g) * 8 + 0.5
    shares = torch.tensor([o.kept(L) / L for o in MENU])
    rec = 1 - torch.exp(-steep * shares) * (1 - shares) + torch.rand(60, len(MENU), generator=g) * 0.01
    rec[:, -1] = 1.0
    for target in (0.2, 0.55, 0.7, 0.9):
        choice = allocate(rec, cost, target)
        mean_cost = float(cost[choice].mean())
        assert mean_cost <= target + 1e-9
        assert mean_cost >= target - 0.02, "the budget is spent"
        total = float(rec[torch.arange(60), choice].sum())
        for i in range(len(MENU)):
            if cost[i] <= target:  # a uniform allocation that fits
                assert total >= float(rec[:, i].sum()) - 1e-9, (target, MENU[i])
        floored = allocate(rec, cost, target, floor=0.8)
        assert float(cost[floored].min()) >= 0.8 * target and float(cost[floored].mean()) <= target + 1e-9
        assert float(cost[choice].min()) < 0.8 * target, "without the floor, some heads go below it"


def brute_force(rec, cost, target, floor=0.0):
    """The best total recovery over every allocation of the options at or above floor x target that fits (None if
    none fits)."""
    n, k = rec.shape
    on = [i for i in range(k) if cost[i] >= floor * target - 1e-9]
    fits = [sum(float(rec[h, c]) for h, c in enumerate(cs)) for cs in itertools.product(on, repeat=n)
            if sum(float(cost[c]) for c in cs) <= target * n + 1e-9]
    return max(fits) if fits else None


def test_allocation_beats_the_issue_example():
    """Issue 23, finding 5: the bisection's leftover loop gave [3, 0] (1.2246); option 2 for both fits (0.773 <=
    0.807) and recovers 1.5606."""
    cost = torch.tensor([0.099, 0.752, 0.773, 1.0], dtype=torch.float64)
    rec = torch.tensor([[.092, .47, .654, .93], [.295, .376, .907, .981]])
    assert allocate(rec, cost, 0.807) == [2, 2]


def test_allocation_is_the_exhaustive_optimum():
    """Concave curves (each extra token recovers less than the one before) on costs of a 0.1 grid."""
    g = torch.Generator().manual_seed(1)
    cost = torch.tensor([0.1, 0.3, 0.5, 1.0], dtype=torch.float64)
    steps = torch.diff(cost, prepend=torch.zeros(1, dtype=torch.float64)).float()
    for trial in range(20):
        slopes = torch.sort(torch.rand(4, 4, generator=g) * 3, dim=1, descending=True).values
        rec = torch.cumsum(slopes * steps, dim=1)
        target = 0.2 + 0.6 * float(torch.rand((), generator=g))
        choice = allocate(rec, cost, target)
        assert float(cost[choice].mean()) <= target + 1e-9
        got = sum(float(rec[h, c]) for h, c in enumerate(choice))
        assert got == pytest.approx(brute_force(rec, cost, target), abs=1e-9), trial


def test_allocation_equals_brute_force_on_random_menus():
    """300 random small cases, any curve shape: costs on the menu's share grid or kept counts at a prompt length,
    floors 0, 0.5 and 1, the last option `full`. The allocation recovers the brute-force optimum and fits; where
    nothing above the floor fits, every head takes its cheapest option above it."""
    g = torch.Generator().manual_seed(5)
    for case in range(300):
        n, k = 1 + case % 4, 2 + case % 5
        if case % 2:  # menu shares: whole multiples of 1/20
            cost = torch.randperm(20, generator=g)[:k].sort().values.double().add(1) / 20
        else:  # kept counts at a length L (kept / L, as BudgetPlanner prices them)
            L = int(torch.randint(5, 300, (), generator=g))
            cost = (torch.randperm(L, generator=g)[:k].sort().values.double() + 1) / L
        cost[-1] = 1.0  # the menu ends in `full`
        rec = torch.rand(n, k, generator=g).double()
        target = float(torch.rand((), generator=g)) * 0.9 + 0.1
        floor = (0.0, 0.5, 1.0)[case % 3]
        choice = allocate(rec, cost, target, floor)
        assert all(cost[c] >= floor * target - 1e-9 for c in choice), case
        best = brute_force(rec, cost, target, floor)
        if best is None:
            cheapest = float(cost[cost >= floor * target - 1e-9].min())
            assert all(float(cost[c]) == cheapest for c in choice), case
            continue
        assert float(cost[choice].mean()) <= target + 1e-9, case
        assert float(rec[torch.arange(n), choice].sum()) == pytest.approx(best, abs=1e-9), case


def test_allocation_spends_the_budget_on_ties():
    """Heads that gain nothing from tokens still take what is left (the most tokens among equal recoveries): a
    target of 1 keeps everything; the same input always gives the same choice."""
    shares = torch.tensor([o.share for o in MENU], dtype=torch.float64)
    zero = torch.zeros(3, len(MENU))
    assert allocate(zero, shares, 1.0) == [len(MENU) - 1] * 3  # full
    assert float(shares[allocate(zero, shares, 0.6)].mean()) == pytest.approx(0.6)
    one_gains = torch.stack([shares.float(), torch.zeros(len(MENU))])  # head 0 gains, head 1 does not
    choice = allocate(one_gains, shares, 0.6)
    assert float(shares[choice[0]]) == 1.0 and float(shares[choice[1]]) == pytest.approx(0.2)
    assert allocate(one_gains, shares, 0.6) == choice


def test_large_allocations_fit_and_beat_every_uniform_one(monkeypatch):
    """Past DP_CELLS the Lagrangian allocation: it fits, and recovers at least what any uniform allocation that fits
    recovers (the leftover spent, then the best uniform one if it recovers more)."""
    monkeypatch.setattr(allocation, "DP_CELLS", 1)
    cost = torch.tensor([0.099, 0.752, 0.773, 1.0], dtype=torch.float64)
    rec = torch.tensor([[.092, .47, .654, .93], [.295, .376, .907, .981]])
    assert allocate(rec, cost, 0.807) == [2, 2]  # the uniform option 2 beats the priced choice [3, 0]
    g = torch.Generator().manual_seed(6)
    for case in range(50):
        rec = torch.rand(3, 5, generator=g).double()
        cost = torch.rand(5, generator=g).double().sort().values
        target = float(torch.rand((), generator=g))
        choice = allocate(rec, cost, target)
        if float(cost.min()) > target:
            continue
        total = float(rec[torch.arange(3), choice].sum())
        assert float(cost[choice].mean()) <= target + 1e-9, case
        assert all(total >= float(rec[:, i].sum()) - 1e-9 for i in range(5) if cost[i] <= target), case


@pytest.fixture
def force_options(monkeypatch):
    """Make the planner hand out the given options, one per KV head."""
    def force(options):
        monkeypatch.setattr(budget, "allocate", lambda rec, cost, target, floor: [MENU.index(o) for o in options])
    return force


@pytest.mark.parametrize("device", DEVICES)
def test_budget_stores_per_head_ratios_300_steps(device, force_options):
    """Four heads, four stores with different ratios in one layer, against dense attention masked to each head's
    bitmap at every step (tests/test_fastgen_store.run checks budgets, eviction order, scores and bytes)."""
    options = [Option(FREQUENT, 0, 0.2), Option(LOCAL | FREQUENT, 0.15, 0.15), Option(FULL),
               Option(FREQUENT, 0, 0.55)]
    assert all(o in MENU for o in options)
    force_options(options)
    cfg = FastGenConfig(profile="budget", kv_budget=0.5, observation=8, head_floor=0.0,
                        shapes="profile")
    cache, ref = run(cfg, device, steps=300, seed=4)
    assert cache.options == options and len(cache.stores) == 4
    for s in cache.stores:
        share = s.cfg.local_ratio + s.cfg.frequent_ratio
        if s.policy != FULL:
            assert abs(s.kept / cache.length - share) <= 2 / cache.length, (s.policy, s.kept, share)
    assert ref.grew > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kv_budget", [0.3, 0.7])
def test_budget_profile_keeps_what_it_promised(device, kv_budget):
    """Unpatched: the set each head stores at prefill recovers exactly the observation attention its option was
    chosen for, and the layer keeps about kv_budget of the tokens."""
    cfg = FastGenConfig(profile="budget", kv_budget=kv_budget, observation=12, head_floor=0.0,
                        shapes="profile")
    cache, ref = run(cfg, device, steps=0, seed=9)
    L, first = L0, L0 - 12
    mask = resident(cache, L)
    obs = ref.attn[:, first:].sum(1)  # (n_kv_heads, L) the observation rows' column sums
    key = ref.attn.sum(1) / torch.arange(L, 0, -1)  # the store's ranking: mean over every row that saw the token
    rec = option_recoveries(obs, first, key=key)
    for h, o in enumerate(cache.options):
        promised = float(rec[h, MENU.index(o)])
        stored = float(obs[h, mask[h]].sum()) / 12
        assert stored == pytest.approx(promised, abs=1e-5), (h, o)
    assert len(set(cache.options)) > 1, "with no floor, heads get different options"
    assert abs(kept_fraction([cache]) - kv_budget) <= 0.1  # 4 heads x 30 tokens: coarse


@pytest.mark.parametrize("device", DEVICES)
def test_default_floor_keeps_every_head_at_the_budget(device):
    cfg = FastGenConfig(profile="budget", kv_budget=0.5)
    assert cfg.head_floor == 1.0
    cache, _ = run(cfg, device, steps=20, seed=2)
    assert {o.local_ratio + o.frequent_ratio for o in cache.options} == {0.5}


@pytest.mark.parametrize("kv_budget", [0.55, 0.8])
def test_default_shape_is_the_fixed_local_frequent_policy(tiny_model_dir, monkeypatch, kv_budget):
    """The default shape at a floor of 1 keeps, in every head, what the fixed local+frequent policy keeps at
    r_l = r_f = kv_budget / 2: the same logits at every step, bit for bit. Nothing is left to choose, so the
    planner computes no recoveries."""
    from tinygen.generate import decode_step, prefill
    from tinygen.loader import load_model

    model = load_model(tiny_model_dir)
    c = model.cfg
    L, steps = 41, 24
    ids = torch.randint(3, c.vocab_size, (L + steps,), generator=torch.Generator().manual_seed(7)).tolist()
    monkeypatch.setattr(budget, "option_recoveries", lambda *a, **k: pytest.fail("recoveries computed"))
    runs = []
    for cfg in (FastGenConfig(kv_budget=kv_budget, observation=8),
                FastGenConfig("local+frequent", local_ratio=kv_budget / 2, frequent_ratio=kv_budget / 2)):
        kinds = TokenKinds([0] * c.vocab_size, L + steps, torch.device("cpu"))
        caches = fastgen_caches(model, kinds, cfg, L + steps)
        kinds.append(ids[:L])
        logits = [prefill(model, ids[:L], caches)]
        for pos in range(L, L + steps - 1):  # teacher-forced along the same tokens
            kinds.append([ids[pos]])
            logits.append(decode_step(model, torch.tensor([ids[pos]]), caches, pos))
        runs.append((torch.stack(logits), [x.kept_tokens() for x in caches], caches))
    assert torch.equal(runs[0][0], runs[1][0])
    assert runs[0][1] == runs[1][1]
    assert {o.label for x in runs[0][2] for o in x.options} == {f"h{round(100 * kv_budget)}"}


def test_one_shape_takes_what_allocate_takes_on_the_grid():
    """With one shape at a floor of 1 the planner skips the recoveries and takes the smallest share at or above the
    budget: on the 0.05 grid and at lengths where no two shares round to the same count, allocate's own choice for
    any recoveries that grow with the share."""
    from tinygen.fastgen.budget import shape_menu, smallest_share

    menu = shape_menu("local+frequent")
    g = torch.Generator().manual_seed(3)
    for L in (60, 97, 200):
        cost = torch.tensor([o.kept(L) / L for o in menu], dtype=torch.float64)
        for b in (0.3, 0.55, 0.7, 0.85):
            rec = torch.rand(6, len(menu), generator=g).sort(dim=1).values
            i = smallest_share(menu, b)
            assert menu[i].share == pytest.approx(b) and menu[i].policy == LOCAL | FREQUENT
            assert allocate(rec, cost, b, floor=1.0) == [i] * 6, (L, b)
    assert menu[smallest_share(menu, 0.73)].share == pytest.approx(0.75)


def test_shapes_choose_the_menu():
    from tinygen.errors import TinygenError
    from tinygen.fastgen.budget import shape_menu

    assert shape_menu("profile") == MENU
    assert {o.policy for o in shape_menu("local+frequent")} == {LOCAL | FREQUENT, FULL}
    assert len(shape_menu("local+frequent")) == 20
    with pytest.raises(TinygenError, match="--shapes must be one of"):
        FastGenConfig(shapes="frequent")


@pytest.mark.parametrize("kv_budget", [0.5, 0.7])
def test_kept_fraction_holds_over_a_generation(engine, kv_budget):  # noqa: F811
    model, tok = engine
    ids = book_prompt(tok, 300)
    steps = 64
    kinds = TokenKinds(vocab_kinds(tok), len(ids) + steps, torch.device("cpu"))
    cfg = FastGenConfig(profile="budget", kv_budget=kv_budget, head_floor=0.5)
    caches = fastgen_caches(model, kinds, cfg, len(ids) + steps)
    seen = []
    for _ in generate(model, ids, caches, steps, ignore_eos=True, on_tokens=kinds.append):
        seen.append(kept_fraction(caches))
    assert len(seen) == steps
    assert all(abs(f - kv_budget) <= 0.02 for f in seen), (min(seen), max(seen))
    opts = {o for c in caches for o in c.options}
    assert len(opts) > 3, "heads got different budgets"


@pytest.mark.parametrize("shapes", SHAPES)
@pytest.mark.parametrize("kv_budget", [0.3, 0.5, 0.73])
def test_floor_one_plans_each_layer_alone_with_the_model_wide_choices(tiny_model_dir, kv_budget, shapes):
    """At the default floor of 1 each layer compresses right after its own prefill (no prompt K/V waits for other
    layers) and its heads get the options one planner for the whole model gives them; below 1 every layer waits."""
    from tinygen.fastgen.budget import BudgetPlanner, shape_menu
    from tinygen.fastgen.cache import FastGenCache
    from tinygen.generate import prefill
    from tinygen.loader import load_model
    from tinygen.paged import lone_batch

    model = load_model(tiny_model_dir)
    c = model.cfg
    g = torch.Generator().manual_seed(int(kv_budget * 100))
    for L in (23, 40, 57):
        ids = torch.randint(3, c.vocab_size, (L,), generator=g).tolist()
        options = []
        for floor, shared in ((1.0, False), (1.0, True), (0.5, True)):
            cfg = FastGenConfig(kv_budget=kv_budget, head_floor=floor, observation=8, shapes=shapes)
            assert cfg.model_wide == (floor < 1)
            kinds = TokenKinds([0] * c.vocab_size, L + 1, torch.device("cpu"))
            kinds.append(ids)
            if shared:  # one planner for every layer, whatever the floor
                planner = BudgetPlanner(c.n_layers, kv_budget, floor, shape_menu(shapes))
                paged = lone_batch(model, L + 1)
                caches = [FastGenCache(paged, 0, i, c.n_heads, c.n_kv_heads, kinds, cfg, planner)
                          for i in range(c.n_layers)]
                paged.set_batch([(0, caches)])
            else:
                caches = fastgen_caches(model, kinds, cfg, L + 1)
            waiting = []  # after each layer's prefill: how many layers' rows still hold their whole prompt
            prefill(model, ids, caches, on_layer=lambda i: waiting.append(sum(x.pending for x in caches)))
            expect = list(range(1, c.n_layers)) + [0] if shared else [0] * c.n_layers
            assert waiting == expect
            options.append([o for x in caches for o in x.options])
        assert options[0] == options[1], (L, kv_budget)
        assert options[2] != options[0] or kv_budget == 0.73  # below the floor the planner moves memory


def test_layer_budgets_give_each_layer_its_own_share(tiny_model_dir):
    """layer_budgets: every head of layer i keeps the menu share at budget i (the smallest step of 0.05 at or above
    it), through prefill and decoding; the batch admission counts their mean; bad lists are one-line errors."""
    from tinygen.projection import kept_share
    from tinygen.errors import TinygenError
    from tinygen.loader import load_model

    model = load_model(tiny_model_dir)
    c = model.cfg
    budgets = tuple([0.3, 1.0, 0.71, 0.82, 0.5][i % 5] for i in range(c.n_layers))
    shares = [0.3, 1.0, 0.75, 0.85, 0.5]
    cfg = FastGenConfig(kv_budget=0.7, layer_budgets=budgets, observation=8)
    L, steps = 60, 12
    ids = torch.randint(3, c.vocab_size, (L,), generator=torch.Generator().manual_seed(4)).tolist()
    kinds = TokenKinds([0] * c.vocab_size, L + steps, torch.device("cpu"))
    caches = fastgen_caches(model, kinds, cfg, L + steps)
    list(generate(model, ids, caches, steps, ignore_eos=True, on_tokens=kinds.append))
    for i, cache in enumerate(caches):
        want = shares[i % 5]
        assert {round(o.local_ratio + o.frequent_ratio, 2) if not o.policy & FULL else 1.0 for o in cache.options} \
            == {want}, i
        n = cache.length
        assert abs(cache.kept_tokens() / (n * c.n_kv_heads) - want) <= 1.5 / n + 1e-9, (i, cache.kept_tokens(), n)
    assert kept_share(cfg) == pytest.approx(sum(shares[i % 5] for i in range(c.n_layers)) / c.n_layers)
    with pytest.raises(TinygenError, match="layer budgets for a model of"):
        fastgen_caches(model, kinds, FastGenConfig(layer_budgets=(0.5,) * (c.n_layers + 1)), L)
    with pytest.raises(TinygenError, match="head floor of 1"):
        FastGenConfig(layer_budgets=(0.5,), head_floor=0.5)
    with pytest.raises(TinygenError, match=r"in \(0, 1\]"):
        FastGenConfig(layer_budgets=(0.5, 0.0))
