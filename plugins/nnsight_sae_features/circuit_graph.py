"""Pictures of a feature circuit (``feature-circuit``): the graph as a PNG and as one
self-contained interactive HTML page, and the faithfulness curves."""

from __future__ import annotations

import html
import json

from nnsight_sae.atomic import write_text
from nnsight_sae.plots import pyplot, save_figure


def layout(result: dict) -> dict:
    """node id -> (x, y): one row per site, earliest at the bottom, the metric on top; each row
    ordered by effect, centred."""
    rows = [[n for n in result["nodes"] if n["site"] == s["site"]] for s in result["sites"]]
    width = max([len(r) for r in rows] + [1])
    xy = {"metric": ((width - 1) / 2, len(rows))}
    for y, row in enumerate(rows):
        row = sorted(row, key=lambda n: -n["effect"])
        offset = (width - len(row)) / 2
        for i, node in enumerate(row):
            xy[node["id"]] = (offset + i, y)
    return xy


def _label(node: dict) -> str:
    feature = "err" if node["feature"] == "error" else str(node["feature"])
    return feature if node.get("position") is None else f"{feature}@{node['position']}"


def plot_graph(result: dict, path) -> None:
    """The graph: sites as rows, nodes sized by |effect| (blue raises the metric, red lowers it),
    edges by |weight|."""
    xy = layout(result)
    plt = pyplot()
    width = max(x for x, _ in xy.values()) + 1
    fig, ax = plt.subplots(figsize=(max(7, 0.9 * width + 2), 1.3 * (len(result["sites"]) + 1) + 1))
    top_edge = max([abs(e["weight"]) for e in result["edges"]] + [1e-9])
    for e in result["edges"]:
        (x0, y0), (x1, y1) = xy[e["from"]], xy[e["to"]]
        ax.plot([x0, x1], [y0, y1], color="C0" if e["weight"] > 0 else "C3", zorder=1,
                linewidth=0.3 + 3 * abs(e["weight"]) / top_edge, alpha=0.6)
    top_node = max([abs(n["effect"]) for n in result["nodes"]] + [1e-9])
    for n in result["nodes"]:
        x, y = xy[n["id"]]
        ax.scatter([x], [y], s=40 + 600 * abs(n["effect"]) / top_node, zorder=2, edgecolors="black",
                   color="#9ecae1" if n["effect"] > 0 else "#fcaeae", marker="s" if n["feature"] == "error" else "o")
        ax.text(x, y - 0.3, _label(n), ha="center", va="top", fontsize=7)
    mx, my = xy["metric"]
    ax.text(mx, my, "metric", ha="center", va="center", bbox={"boxstyle": "round", "facecolor": "#fde9c8"})
    ax.set_yticks(range(len(result["sites"])), [s["site"] for s in result["sites"]])
    ax.set_xticks([])
    ax.set_ylim(-0.8, len(result["sites"]) + 0.5)
    ax.set_xlim(-0.8, width - 0.2)
    ax.set_title(f"feature circuit: {result['task']} ({result['n_prompts']} prompts, {result['estimate']}); "
                 f"squares are error terms")
    save_figure(fig, path)


def plot_curves(result: dict, path) -> None:
    """Faithfulness (and the features' completeness) against the number of nodes kept."""
    c = result["curves"]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(c["n"], c["features"]["faithfulness"], "-o", markersize=3, label="features + errors: faithfulness")
    ax.plot(c["n"], c["features"]["completeness"], "--", color="C0", label="features + errors: circuit ablated")
    ax.plot(c["neurons"]["n"], c["neurons"]["faithfulness"], "-s", markersize=3, color="C1", label="neurons")
    ax.plot(c["n"], c["random"]["faithfulness"], ":", color="grey",
            label=f"random feature nodes (mean of {c['random']['sets']})")
    ax.axhline(result["reach"]["faithfulness"], color="grey", linewidth=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("nodes kept (largest |effect| first; the rest ablated)")
    ax.set_ylabel("faithfulness (1 = clean, 0 = all ablated)")
    ax.set_title(f"feature circuit: {result['task']} ({c['ranking']} node sets, {c['ablation']} ablation)")
    ax.legend(fontsize=8)
    save_figure(fig, path)


_PAGE = """<!doctype html><html lang="en"><head><meta charset="utf-8"><title>Feature circuit: __TITLE__</title>
<style>
body { font-family: system-ui, sans-serif; margin: 20px; color: #222; }
#wrap { display: flex; gap: 24px; align-items: flex-start; }
#graphbox { overflow: auto; max-width: 68vw; }
svg { border: 1px solid #ddd; background: #fcfcfc; }
.node { cursor: pointer; stroke: #333; }
.node.selected { stroke: #b34700; stroke-width: 3; }
#panel { min-width: 340px; max-width: 520px; font-size: 14px; }
.ctx { font-family: ui-monospace, monospace; font-size: 12px; margin: 3px 0; white-space: pre-wrap; }
.stats { color: #555; }
</style></head><body>
<h1>Feature circuit: __TITLE__</h1>
<p class=stats>__STATS__</p>
<div id=wrap><div id=graphbox><svg id=graph></svg></div><div id=panel><p>Click a node to see its top corpus contexts.</p></div></div>
<script type="application/json" id="data">__DATA__</script>
<script>
const data = JSON.parse(document.getElementById("data").textContent);
const svg = document.getElementById("graph"), NS = "http://www.w3.org/2000/svg";
const sx = 90, sy = 110, pad = 60;
const px = ([x, y]) => pad + 120 + x * sx, py = ([x, y]) => pad + (data.rows - y) * sy;
const W = Math.max(...Object.values(data.xy).map(px)) + pad, H = py([0, 0]) + pad;
svg.setAttribute("width", W); svg.setAttribute("height", H);
function el(name, attrs, text) {
  const e = document.createElementNS(NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = text;
  svg.appendChild(e); return e;
}
data.sites.forEach((s, y) => el("text", {x: 8, y: py([0, y]) + 4, "font-size": 12}, s.site));
const maxEdge = Math.max(1e-9, ...data.edges.map(e => Math.abs(e.weight)));
for (const e of data.edges) {
  const a = data.xy[e.from], b = data.xy[e.to];
  el("line", {x1: px(a), y1: py(a), x2: px(b), y2: py(b), stroke: e.weight > 0 ? "#3182bd" : "#de2d26",
              "stroke-width": 0.5 + 5 * Math.abs(e.weight) / maxEdge, "stroke-opacity": 0.55});
}
const m = data.xy.metric;
el("rect", {x: px(m) - 30, y: py(m) - 14, width: 60, height: 28, rx: 8, fill: "#fde9c8", stroke: "#333"});
el("text", {x: px(m), y: py(m) + 4, "text-anchor": "middle", "font-size": 12}, "metric");
const maxNode = Math.max(1e-9, ...data.nodes.map(n => Math.abs(n.effect)));
const esc = t => t.replace(/[&<>]/g, c => ({"&": "&amp;", "<": "&lt;", ">": "&gt;"}[c]));
function show(node, shape) {
  document.querySelectorAll(".node.selected").forEach(e => e.classList.remove("selected"));
  shape.classList.add("selected");
  let h = `<h2>${esc(node.site)} / ${node.feature === "error" ? "error term" : "feature " + node.feature}</h2>`;
  h += `<p class=stats>effect on the metric ${node.effect.toFixed(4)}` +
       (node.position === null ? "" : `, at position ${node.position} from the end`) + `</p>`;
  if (node.de_embedding) h += `<p><b>de-embedding:</b> ${node.de_embedding.map(t => esc(JSON.stringify(t.token))).join(" ")}</p>`;
  if (node.contexts && node.contexts.length) {
    h += `<h3>Top contexts</h3>`;
    for (const c of node.contexts) {
      const top = Math.max(1e-9, ...c.activations);
      const spans = c.tokens.map((t, j) => {
        const shade = (Math.max(0, c.activations[j]) / top).toFixed(2);
        const peak = j === c.max_position ? "; outline: 1px solid #b34700" : "";
        return `<span style="background: rgba(255,140,0,${shade})${peak}">${esc(t)}</span>`;
      }).join("");
      h += `<div class=ctx><b>${c.activation.toFixed(2)}</b> ${spans}</div>`;
    }
  } else if (node.feature === "error") {
    h += `<p>The error term: what the dictionary does not reconstruct at this site.</p>`;
  } else {
    h += `<p>No corpus contexts were read for this node.</p>`;
  }
  document.getElementById("panel").innerHTML = h;
}
for (const node of data.nodes) {
  const p = data.xy[node.id], r = 5 + 18 * Math.sqrt(Math.abs(node.effect) / maxNode);
  const attrs = {class: "node", "data-node": node.id, fill: node.effect > 0 ? "#9ecae1" : "#fcaeae"};
  const shape = node.feature === "error"
    ? el("rect", {...attrs, x: px(p) - r, y: py(p) - r, width: 2 * r, height: 2 * r})
    : el("circle", {...attrs, cx: px(p), cy: py(p), r: r});
  shape.appendChild(Object.assign(document.createElementNS(NS, "title"), {textContent: `${node.id}: effect ${node.effect.toFixed(4)}`}));
  shape.addEventListener("click", () => show(node, shape));
  el("text", {x: px(p), y: py(p) + r + 12, "text-anchor": "middle", "font-size": 10},
     node.feature === "error" ? "err" : String(node.feature));
}
</script></body></html>
"""


def render_page(result: dict, path) -> None:
    """One self-contained page (inline SVG and script, no network): the graph, and a panel with
    the clicked node's effect, de-embedding and top corpus contexts."""
    data = {"nodes": result["nodes"], "edges": result["edges"], "sites": result["sites"],
            "xy": layout(result), "rows": len(result["sites"])}
    reach = result["reach"]["nodes"]
    stats = (f"{html.escape(result['model'])}; {result['n_prompts']} prompts; {result['estimate']}; "
             f"{len(result['nodes'])} nodes, {len(result['edges'])} edges shown. Nodes kept for "
             f"{result['reach']['faithfulness']:.0%} faithfulness: features {reach['features']}, "
             f"neurons {reach['neurons']}, random {reach['random']}.")
    page = (_PAGE.replace("__TITLE__", html.escape(result["task"])).replace("__STATS__", stats)
            .replace("__DATA__", json.dumps(data).replace("</", "<\\/")))
    write_text(path, page)
