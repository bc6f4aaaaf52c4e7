package benchplot

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"math"
	"strconv"
	"strings"
)

// Chart geometry, in SVG user units (pixels).
const (
	width   = 640
	height  = 400
	marginL = 72
	marginR = 24
	marginT = 40
	marginB = 56
	legendW = 230
	ticks   = 5
)

// palette colours the series in order (colour-blind safe, after Okabe and Ito).
var palette = []string{"#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000"}

// ErrNoData is returned when there is nothing to draw.
var ErrNoData = errors.New("benchplot: no data")

// Series is one line of a Line chart: the points (X[i], Y[i]).
type Series struct {
	// Name labels the series in the legend.
	Name string
	// X and Y are the coordinates; they must have the same length.
	X, Y []float64
}

// Line writes an SVG line chart of series, with markers at every point. With logX the x axis
// is logarithmic (every X must then be positive), as for a value against N = 100, 1000, 5000.
// The y axis starts at zero. It fails with ErrNoData when no series has a point, and when a
// series' X and Y differ in length or hold NaN or infinite values.
func Line(w io.Writer, title, xLabel, yLabel string, logX bool, series ...Series) error {
	var xs, ys []float64
	for _, s := range series {
		if len(s.X) != len(s.Y) {
			return fmt.Errorf("benchplot: series %q has %d x and %d y values", s.Name, len(s.X), len(s.Y))
		}
		for i := range s.X {
			if !finite(s.X[i]) || !finite(s.Y[i]) {
				return fmt.Errorf("benchplot: series %q: point %d is not finite", s.Name, i)
			}
			if logX && s.X[i] <= 0 {
				return fmt.Errorf("benchplot: series %q: x = %g on a logarithmic axis", s.Name, s.X[i])
			}
		}
		xs = append(xs, s.X...)
		ys = append(ys, s.Y...)
	}
	if len(xs) == 0 {
		return ErrNoData
	}
	xmin, xmax := minMax(xs)
	_, ymax := minMax(ys)
	ymax = niceCeil(max(ymax, 0))
	if ymax == 0 {
		ymax = 1
	}
	tx := func(x float64) float64 { return x }
	if logX {
		tx = math.Log10
		xmin, xmax = math.Pow(10, math.Floor(math.Log10(xmin))), math.Pow(10, math.Ceil(math.Log10(xmax)))
	} else {
		xmin = math.Min(xmin, 0)
		xmax = niceCeil(xmax)
	}
	if tx(xmax) == tx(xmin) {
		xmax = xmin + 1
		if logX {
			xmax = xmin * 10
		}
	}
	plotR := width - marginR - legendW
	px := func(x float64) float64 {
		return marginL + (tx(x)-tx(xmin))/(tx(xmax)-tx(xmin))*float64(plotR-marginL)
	}
	py := func(y float64) float64 {
		return float64(height-marginB) - y/ymax*float64(height-marginB-marginT)
	}

	var b strings.Builder
	header(&b, title)
	// Axes and grid.
	for i := 0; i <= ticks; i++ {
		y := ymax * float64(i) / ticks
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>`+"\n", marginL, py(y), plotR, py(y))
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", marginL-6, py(y), esc(num(y)))
	}
	for _, x := range xTicks(xmin, xmax, logX) {
		fmt.Fprintf(&b, `<line x1="%.1f" y1="%d" x2="%.1f" y2="%d" stroke="#ddd"/>`+"\n", px(x), marginT, px(x), height-marginB)
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">%s</text>`+"\n", px(x), height-marginB+18, esc(num(x)))
	}
	axes(&b, plotR, xLabel, yLabel)
	// Series and legend.
	for i, s := range series {
		col := palette[i%len(palette)]
		if len(s.X) > 0 {
			var pts []string
			for j := range s.X {
				pts = append(pts, fmt.Sprintf("%.1f,%.1f", px(s.X[j]), py(s.Y[j])))
			}
			fmt.Fprintf(&b, `<polyline fill="none" stroke="%s" stroke-width="2" points="%s"/>`+"\n", col, strings.Join(pts, " "))
			for j := range s.X {
				fmt.Fprintf(&b, `<circle cx="%.1f" cy="%.1f" r="3.5" fill="%s"><title>%s</title></circle>`+"\n",
					px(s.X[j]), py(s.Y[j]), col, esc(fmt.Sprintf("%s: %s at %s", s.Name, num(s.Y[j]), num(s.X[j]))))
			}
		}
		ly := marginT + 10 + i*20
		fmt.Fprintf(&b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="%s" stroke-width="2"/>`+"\n", plotR+16, ly, plotR+36, ly, col)
		fmt.Fprintf(&b, `<text x="%d" y="%d" dominant-baseline="middle">%s</text>`+"\n", plotR+42, ly, esc(s.Name))
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// Bar is one bar of a Bars chart.
type Bar struct {
	// Label names the bar under the axis.
	Label string
	// Value is the bar's height; it must be finite and not negative.
	Value float64
}

// Bars writes an SVG bar chart, one bar per entry in order, each labelled with its value. It
// fails with ErrNoData when bars is empty, and when a value is negative, NaN or infinite.
func Bars(w io.Writer, title, yLabel string, bars []Bar) error {
	if len(bars) == 0 {
		return ErrNoData
	}
	var vals []float64
	for _, br := range bars {
		if !finite(br.Value) || br.Value < 0 {
			return fmt.Errorf("benchplot: bar %q: value %g", br.Label, br.Value)
		}
		vals = append(vals, br.Value)
	}
	_, ymax := minMax(vals)
	ymax = niceCeil(ymax)
	if ymax == 0 {
		ymax = 1
	}
	plotR := width - marginR
	py := func(y float64) float64 {
		return float64(height-marginB) - y/ymax*float64(height-marginB-marginT)
	}
	var b strings.Builder
	header(&b, title)
	for i := 0; i <= ticks; i++ {
		y := ymax * float64(i) / ticks
		fmt.Fprintf(&b, `<line x1="%d" y1="%.1f" x2="%d" y2="%.1f" stroke="#ddd"/>`+"\n", marginL, py(y), plotR, py(y))
		fmt.Fprintf(&b, `<text x="%d" y="%.1f" text-anchor="end" dominant-baseline="middle">%s</text>`+"\n", marginL-6, py(y), esc(num(y)))
	}
	axes(&b, plotR, "", yLabel)
	slot := float64(plotR-marginL) / float64(len(bars))
	for i, br := range bars {
		x := float64(marginL) + slot*float64(i) + slot*0.15
		bw := slot * 0.7
		col := palette[i%len(palette)]
		fmt.Fprintf(&b, `<rect x="%.1f" y="%.1f" width="%.1f" height="%.1f" fill="%s"><title>%s</title></rect>`+"\n",
			x, py(br.Value), bw, py(0)-py(br.Value), col, esc(fmt.Sprintf("%s: %s", br.Label, num(br.Value))))
		fmt.Fprintf(&b, `<text x="%.1f" y="%.1f" text-anchor="middle">%s</text>`+"\n", x+bw/2, py(br.Value)-5, esc(num(br.Value)))
		fmt.Fprintf(&b, `<text x="%.1f" y="%d" text-anchor="middle">`, x+bw/2, height-marginB+18)
		for j, line := range wrap(br.Label, slot*0.95) {
			dy := "0"
			if j > 0 {
				dy = "1.2em"
			}
			fmt.Fprintf(&b, `<tspan x="%.1f" dy="%s">%s</tspan>`, x+bw/2, dy, esc(line))
		}
		b.WriteString("</text>\n")
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

// Stack writes one SVG document holding the given charts (as written by Line or Bars) one
// above the other. It fails with ErrNoData when charts is empty.
func Stack(w io.Writer, charts ...[]byte) error {
	if len(charts) == 0 {
		return ErrNoData
	}
	var b strings.Builder
	fmt.Fprintf(&b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d">`+"\n",
		width, height*len(charts), width, height*len(charts))
	for i, c := range charts {
		body := bytes.TrimSpace(c)
		if !bytes.HasPrefix(body, []byte("<svg ")) {
			return fmt.Errorf("benchplot: chart %d is not an SVG document written by this package", i)
		}
		// Nested <svg> elements take x and y: place each chart in its row.
		fmt.Fprintf(&b, `<svg x="0" y="%d" %s`+"\n", height*i, body[len("<svg "):])
	}
	b.WriteString("</svg>\n")
	_, err := io.WriteString(w, b.String())
	return err
}

func header(b *strings.Builder, title string) {
	fmt.Fprintf(b, `<svg xmlns="http://www.w3.org/2000/svg" width="%d" height="%d" viewBox="0 0 %d %d" font-family="sans-serif" font-size="12">`+"\n",
		width, height, width, height)
	fmt.Fprintf(b, `<rect width="%d" height="%d" fill="white"/>`+"\n", width, height)
	fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="middle" font-size="15" font-weight="bold">%s</text>`+"\n", width/2, 24, esc(title))
}

func axes(b *strings.Builder, plotR int, xLabel, yLabel string) {
	fmt.Fprintf(b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", marginL, height-marginB, plotR, height-marginB)
	fmt.Fprintf(b, `<line x1="%d" y1="%d" x2="%d" y2="%d" stroke="black"/>`+"\n", marginL, marginT, marginL, height-marginB)
	if xLabel != "" {
		fmt.Fprintf(b, `<text x="%d" y="%d" text-anchor="middle">%s</text>`+"\n", (marginL+plotR)/2, height-14, esc(xLabel))
	}
	if yLabel != "" {
		cy := (marginT + height - marginB) / 2
		fmt.Fprintf(b, `<text x="16" y="%d" text-anchor="middle" transform="rotate(-90 16 %d)">%s</text>`+"\n", cy, cy, esc(yLabel))
	}
}

// xTicks returns the x tick positions: powers of ten on a log axis, else five even steps.
func xTicks(xmin, xmax float64, logX bool) []float64 {
	var out []float64
	if logX {
		for e := math.Floor(math.Log10(xmin)); e <= math.Ceil(math.Log10(xmax)); e++ {
			out = append(out, math.Pow(10, e))
		}
		return out
	}
	for i := 0; i <= ticks; i++ {
		out = append(out, xmin+(xmax-xmin)*float64(i)/ticks)
	}
	return out
}

// niceCeil rounds v up to 1, 2, 2.5 or 5 times a power of ten.
func niceCeil(v float64) float64 {
	if v <= 0 {
		return 0
	}
	p := math.Pow(10, math.Floor(math.Log10(v)))
	for _, m := range []float64{1, 2, 2.5, 5, 10} {
		if v <= m*p*(1+1e-9) {
			return m * p
		}
	}
	return 10 * p
}

func minMax(vs []float64) (lo, hi float64) {
	lo, hi = math.Inf(1), math.Inf(-1)
	for _, v := range vs {
		lo, hi = math.Min(lo, v), math.Max(hi, v)
	}
	return lo, hi
}

func finite(v float64) bool { return !math.IsNaN(v) && !math.IsInf(v, 0) }

// num formats a value compactly: 5000, 10000, 0.25, 2.341, 1.5e+12.
func num(v float64) string {
	if v == math.Trunc(v) && math.Abs(v) < 1e9 {
		return strconv.FormatFloat(v, 'f', -1, 64)
	}
	return strconv.FormatFloat(v, 'g', 4, 64)
}

// charWidth is the approximate width of a character of the 12-unit sans-serif font.
const charWidth = 6.6

// wrap splits s into lines of at most width units, at spaces.
func wrap(s string, width float64) []string {
	maxChars := max(int(width/charWidth), 1)
	var lines []string
	cur := ""
	for _, w := range strings.Fields(s) {
		switch {
		case cur == "":
			cur = w
		case len(cur)+1+len(w) <= maxChars:
			cur += " " + w
		default:
			lines = append(lines, cur)
			cur = w
		}
	}
	if cur != "" {
		lines = append(lines, cur)
	}
	return lines
}

// esc escapes text for SVG character data and attribute values.
func esc(s string) string {
	var b bytes.Buffer
	for _, r := range s {
		switch r {
		case '<':
			b.WriteString("&lt;")
		case '>':
			b.WriteString("&gt;")
		case '&':
			b.WriteString("&amp;")
		case '"':
			b.WriteString("&quot;")
		case '\'':
			b.WriteString("&#39;")
		default:
			b.WriteRune(r)
		}
	}
	return b.String()
}
