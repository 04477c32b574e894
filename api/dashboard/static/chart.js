// A small SVG line chart: numbered series over training steps, axes with round ticks, a legend, and each
// point's value on hover (an SVG <title>). Colours come from style.css (.s0 … .s7), so none is inline.

import { h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const WIDTH = 600;
const HEIGHT = 220;
const MARGIN = { left: 52, right: 14, top: 10, bottom: 26 };
const COLOURS = 8;

function s(tag, attrs, ...children) {
  const element = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs)) element.setAttribute(name, value);
  element.append(...children);
  return element;
}

/** About `count` round values (1, 2 or 5 times a power of ten apart) covering [low, high]. */
export function ticks(low, high, count = 5) {
  const span = high - low;
  const magnitude = 10 ** Math.floor(Math.log10(span / count));
  const step = [1, 2, 5, 10].map((m) => m * magnitude).find((m) => span / m <= count);
  const decimals = Math.max(0, -Math.floor(Math.log10(step)));
  const values = [];
  for (let i = Math.floor(low / step); i <= Math.ceil(high / step); i++)
    values.push(Number((i * step).toFixed(decimals)));
  return values;
}

const label = (value) => String(Number(value.toPrecision(3)));

/**
 * series: [{name, points: [[step, value], …]}] sorted by step; xMax: the step the axis runs to (the
 * job's total steps, so a live curve grows across a fixed axis).
 */
export function lineChart(title, series, xMax = 0) {
  series = series.filter((line) => line.points.length);
  const figure = h("figure", { class: "chart" }, h("figcaption", null, title));
  if (!series.length) return figure;
  const points = series.flatMap((line) => line.points);
  const xTicks = ticks(0, Math.max(xMax, ...points.map(([x]) => x), 1));
  let low = Math.min(...points.map(([, y]) => y));
  let high = Math.max(...points.map(([, y]) => y));
  if (low === high) [low, high] = low === 0 ? [0, 1] : [low - Math.abs(low) / 2, high + Math.abs(high) / 2];
  const yTicks = ticks(low, high);
  const [x0, x1, y0, y1] = [0, xTicks.at(-1), yTicks[0], yTicks.at(-1)];
  const x = (v) => (MARGIN.left + ((v - x0) / (x1 - x0)) * (WIDTH - MARGIN.left - MARGIN.right)).toFixed(1);
  const y = (v) =>
    (HEIGHT - MARGIN.bottom - ((v - y0) / (y1 - y0)) * (HEIGHT - MARGIN.top - MARGIN.bottom)).toFixed(1);

  const svg = s("svg", { viewBox: `0 0 ${WIDTH} ${HEIGHT}`, role: "img", "aria-label": title });
  for (const v of yTicks) {
    svg.append(s("line", { class: "grid", x1: MARGIN.left, x2: WIDTH - MARGIN.right, y1: y(v), y2: y(v) }));
    svg.append(
      s(
        "text",
        { class: "tick", x: MARGIN.left - 6, y: y(v), "text-anchor": "end", "dominant-baseline": "middle" },
        label(v),
      ),
    );
  }
  for (const v of xTicks) {
    svg.append(s("text", { class: "tick", x: x(v), y: HEIGHT - 8, "text-anchor": "middle" }, label(v)));
  }
  svg.append(
    s("line", {
      class: "axis",
      x1: MARGIN.left,
      x2: WIDTH - MARGIN.right,
      y1: HEIGHT - MARGIN.bottom,
      y2: HEIGHT - MARGIN.bottom,
    }),
  );

  const legend = h("ul", { class: "legend" });
  series.forEach((line, i) => {
    const colour = `s${i % COLOURS}`;
    const d = line.points.map(([px, py], j) => `${j ? "L" : "M"}${x(px)},${y(py)}`).join("");
    const group = s("g", { class: `series ${colour}`, "data-series": line.name }, s("path", { d }));
    for (const [px, py] of line.points) {
      group.append(
        s(
          "circle",
          { cx: x(px), cy: y(py), r: line.points.length > 40 ? 1.5 : 3 },
          s("title", {}, `${line.name} at step ${px}: ${py}`),
        ),
      );
    }
    svg.append(group);
    legend.append(h("li", { class: colour }, h("span", { class: "swatch" }), line.name));
  });
  figure.append(svg, legend);
  return figure;
}
