"""Readable tables of per-head sink divergence, for one checkpoint or two side by side."""


def head_name(layer, head):
    return f"L{layer}.h{head}"


def positive_count(divergence):
    return sum(1 for row in divergence for d in row if d > 0)


def _extremes(row):
    high = max(range(len(row)), key=lambda h: row[h])
    low = min(range(len(row)), key=lambda h: row[h])
    return high, low


def single_table(result, top=10):
    div = result["divergence"]
    n_heads = len(div[0])
    lines = [f"{'layer':>5}  {'positive':>8}  {'largest d (head)':>20}  {'smallest d (head)':>20}"]
    for layer, row in enumerate(div):
        high, low = _extremes(row)
        n_pos = sum(1 for d in row if d > 0)
        lines.append(f"{layer:>5}  {f'{n_pos}/{n_heads}':>8}  {f'{row[high]:+.5f} (h{high})':>20}  "
                     f"{f'{row[low]:+.5f} (h{low})':>20}")
    ranked = sorted(((d, l, h) for l, row in enumerate(div) for h, d in enumerate(row)), reverse=True)[:top]
    lines.append("largest divergences: " + ", ".join(f"{head_name(l, h)} {d:+.5f}" for d, l, h in ranked))
    lines.append(f"positive-divergence heads: {result['positive']} of {len(div) * n_heads}")
    return "\n".join(lines)


def sign_flips(before, after):
    """(layer, head, d_before, d_after) for every head whose divergence changed sign (> 0 versus <= 0)."""
    return [(l, h, a, b) for l, (row_a, row_b) in enumerate(zip(before, after))
            for h, (a, b) in enumerate(zip(row_a, row_b)) if (a > 0) != (b > 0)]


def compare_table(result, other, name, other_name, top=10):
    div, div_o = result["divergence"], other["divergence"]
    n_heads = len(div[0])
    lines = [f"A = {name}", f"B = {other_name}",
             f"{'layer':>5}  {'pos A':>6}  {'pos B':>6}  {'max d A':>9}  {'max d B':>9}  sign flips A -> B"]
    for layer, (row, row_o) in enumerate(zip(div, div_o)):
        flips = [f"h{h}{'+' if b > 0 else '-'}" for _, h, _, b in sign_flips([row], [row_o])]
        lines.append(f"{layer:>5}  {sum(d > 0 for d in row):>6}  {sum(d > 0 for d in row_o):>6}  "
                     f"{max(row):>+9.5f}  {max(row_o):>+9.5f}  {' '.join(flips) if flips else '-'}")
    flips = sign_flips(div, div_o)
    up = [f for f in flips if f[3] > 0]
    down = [f for f in flips if f[3] <= 0]
    total = len(div) * n_heads
    lines.append(f"positive-divergence heads: A {result['positive']} of {total}, B {other['positive']} of {total}")
    lines.append(f"sign flips: {len(up)} heads became positive in B, {len(down)} became non-positive "
                 "(h3+ : positive in B only, h3- : positive in A only)")
    for label, group in (("became positive", up), ("became non-positive", down)):
        if group:
            shown = sorted(group, key=lambda f: -abs(f[3] - f[2]))[:top]
            lines.append(f"  {label}: " + ", ".join(f"{head_name(l, h)} {a:+.5f} -> {b:+.5f}" for l, h, a, b in shown)
                         + (" ..." if len(group) > top else ""))
    return "\n".join(lines)
