// Charts as plain SVG: a line chart with axes and a legend, and a confusion matrix as a heat map
// that shows its counts (readable without colour).

const SVG = "http://www.w3.org/2000/svg";
const COLOURS = ["#2457c5", "#c55a11", "#17723a", "#7b3fb5", "#b3261e"];

function el(name, attrs = {}, text) {
  const node = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

function fmt(v) {
  if (v === 0) return "0";
  const a = Math.abs(v);
  return a >= 1000 || a < 0.01 ? v.toExponential(1) : Number(v.toPrecision(3)).toString();
}

/**
 * A line chart. `series`: [{name, points: [[x, y], …]}]. Returns an <svg> with a <title> that
 * names it for screen readers.
 */
export function lineChart(title, series, { xLabel = "", width = 520, height = 240 } = {}) {
  const pad = { l: 52, r: 12, t: 24, b: 34 };
  const all = series.flatMap((s) => s.points);
  const svg = el("svg", { class: "chart", viewBox: `0 0 ${width} ${height}`, role: "img" });
  svg.append(el("title", {}, title));
  svg.append(el("text", { x: pad.l, y: 15, "font-weight": "600" }, title));
  if (!all.length) {
    svg.append(el("text", { x: width / 2, y: height / 2, "text-anchor": "middle" }, "no data yet"));
    return svg;
  }
  let [x0, x1] = [Math.min(...all.map((p) => p[0])), Math.max(...all.map((p) => p[0]))];
  let [y0, y1] = [Math.min(...all.map((p) => p[1])), Math.max(...all.map((p) => p[1]))];
  if (x0 === x1) [x0, x1] = [x0 - 1, x1 + 1];
  if (y0 === y1) [y0, y1] = [y0 - Math.abs(y0 || 1) * 0.1, y1 + Math.abs(y1 || 1) * 0.1];
  const X = (x) => pad.l + ((x - x0) / (x1 - x0)) * (width - pad.l - pad.r);
  const Y = (y) => height - pad.b - ((y - y0) / (y1 - y0)) * (height - pad.t - pad.b);
  svg.append(el("line", { x1: pad.l, y1: height - pad.b, x2: width - pad.r, y2: height - pad.b, stroke: "#9aa3b5" }));
  svg.append(el("line", { x1: pad.l, y1: pad.t, x2: pad.l, y2: height - pad.b, stroke: "#9aa3b5" }));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.append(el("text", { x: pad.l - 6, y: Y(y) + 4, "text-anchor": "end" }, fmt(y)));
    svg.append(el("line", { x1: pad.l, y1: Y(y), x2: width - pad.r, y2: Y(y), stroke: "#eceef2" }));
  }
  for (const x of [x0, x1]) svg.append(el("text", { x: X(x), y: height - pad.b + 16, "text-anchor": "middle" }, fmt(x)));
  svg.append(el("text", { x: (width + pad.l) / 2, y: height - 4, "text-anchor": "middle" }, xLabel));
  series.forEach((s, i) => {
    const colour = COLOURS[i % COLOURS.length];
    const d = s.points.map((p, j) => `${j ? "L" : "M"}${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join("");
    svg.append(el("path", { d, fill: "none", stroke: colour, "stroke-width": 2 }));
    if (s.points.length < 30) {
      for (const p of s.points) svg.append(el("circle", { cx: X(p[0]), cy: Y(p[1]), r: 3, fill: colour }));
    }
    const lx = width - pad.r - 130;
    svg.append(el("rect", { x: lx, y: pad.t + i * 16, width: 10, height: 10, fill: colour }));
    svg.append(el("text", { x: lx + 14, y: pad.t + i * 16 + 9 }, s.name));
  });
  return svg;
}

/** A confusion matrix (rows: true class, columns: predicted) as a table shaded by row share. */
export function heatmap(matrix, labels) {
  const table = document.createElement("table");
  table.className = "heat";
  table.setAttribute("aria-label", "Confusion matrix: rows are true classes, columns predicted classes");
  const head = table.createTHead().insertRow();
  head.insertCell().outerHTML = "<th>true \\ predicted</th>";
  for (const l of labels) {
    const th = document.createElement("th");
    th.textContent = l;
    head.append(th);
  }
  const body = table.createTBody();
  matrix.forEach((row, i) => {
    const tr = body.insertRow();
    const th = document.createElement("th");
    th.textContent = labels[i];
    tr.append(th);
    const total = row.reduce((a, b) => a + b, 0) || 1;
    row.forEach((n, j) => {
      const td = tr.insertCell();
      td.textContent = n;
      const share = n / total;
      const hue = i === j ? "36, 87, 197" : "179, 38, 30";
      td.style.background = `rgba(${hue}, ${(0.08 + share * 0.75).toFixed(2)})`;
      td.style.color = share > 0.55 ? "#fff" : "inherit";
      td.title = `${labels[i]} predicted as ${labels[j]}: ${n}`;
    });
  });
  return table;
}
