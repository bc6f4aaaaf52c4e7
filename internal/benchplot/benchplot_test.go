package benchplot

import (
	"bytes"
	"encoding/xml"
	"errors"
	"io"
	"math"
	"strings"
	"testing"
)

// wellFormed parses svg with encoding/xml to the end and returns the root element's name.
func wellFormed(t *testing.T, svg []byte) string {
	t.Helper()
	d := xml.NewDecoder(bytes.NewReader(svg))
	root := ""
	for {
		tok, err := d.Token()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			t.Fatalf("not well-formed XML: %v\n%s", err, svg)
		}
		if se, ok := tok.(xml.StartElement); ok && root == "" {
			root = se.Name.Local
		}
	}
	return root
}

func TestLine(t *testing.T) {
	tests := []struct {
		name   string
		logX   bool
		series []Series
	}{
		{"log x", true, []Series{
			{Name: "converged <after create>", X: []float64{100, 1000, 5000}, Y: []float64{0.4, 2.5, 9.1}},
			{Name: "cold start & restart", X: []float64{100, 1000, 5000}, Y: []float64{0.3, 1.2, 4}},
		}},
		{"linear x, one point", false, []Series{{Name: "one", X: []float64{3}, Y: []float64{0}}}},
		{"one empty series beside a full one", false, []Series{{Name: "empty"}, {Name: "full", X: []float64{1, 2}, Y: []float64{2, 1}}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			if err := Line(&b, "Convergence vs N", "N", "seconds", tt.logX, tt.series...); err != nil {
				t.Fatal(err)
			}
			if root := wellFormed(t, b.Bytes()); root != "svg" {
				t.Errorf("root element %q, want svg", root)
			}
			for _, s := range tt.series {
				if !strings.Contains(b.String(), esc(s.Name)) {
					t.Errorf("series name %q missing", s.Name)
				}
			}
		})
	}
}

func TestLineErrors(t *testing.T) {
	tests := []struct {
		name   string
		logX   bool
		series []Series
		noData bool
	}{
		{"no series", false, nil, true},
		{"only empty series", false, []Series{{Name: "a"}}, true},
		{"length mismatch", false, []Series{{Name: "a", X: []float64{1, 2}, Y: []float64{1}}}, false},
		{"NaN", false, []Series{{Name: "a", X: []float64{1}, Y: []float64{math.NaN()}}}, false},
		{"zero on log axis", true, []Series{{Name: "a", X: []float64{0}, Y: []float64{1}}}, false},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			var b bytes.Buffer
			err := Line(&b, "t", "x", "y", tt.logX, tt.series...)
			if err == nil {
				t.Fatal("no error")
			}
			if got := errors.Is(err, ErrNoData); got != tt.noData {
				t.Errorf("errors.Is(%v, ErrNoData) = %v, want %v", err, got, tt.noData)
			}
			if b.Len() != 0 {
				t.Errorf("wrote %d bytes on error", b.Len())
			}
		})
	}
}

func TestBars(t *testing.T) {
	bars := []Bar{{"clear", 12.5}, {"WireGuard (meshcrypt)", 1.9}, {"classifier detached", 0}}
	var b bytes.Buffer
	if err := Bars(&b, "Pod-to-pod throughput", "Gbit/s", bars); err != nil {
		t.Fatal(err)
	}
	wellFormed(t, b.Bytes())
	for _, br := range bars {
		if !strings.Contains(b.String(), br.Label) {
			t.Errorf("bar label %q missing", br.Label)
		}
	}
	if err := Bars(&b, "t", "y", nil); !errors.Is(err, ErrNoData) {
		t.Errorf("no bars: err = %v, want ErrNoData", err)
	}
	if err := Bars(&b, "t", "y", []Bar{{"neg", -1}}); err == nil || errors.Is(err, ErrNoData) {
		t.Errorf("negative bar: err = %v, want a value error", err)
	}
}

func TestStack(t *testing.T) {
	var c1, c2, out bytes.Buffer
	if err := Line(&c1, "a", "N", "s", true, Series{Name: "first", X: []float64{10, 100}, Y: []float64{1, 2}}); err != nil {
		t.Fatal(err)
	}
	if err := Bars(&c2, "b", "Gbit/s", []Bar{{"second", 1}}); err != nil {
		t.Fatal(err)
	}
	if err := Stack(&out, c1.Bytes(), c2.Bytes()); err != nil {
		t.Fatal(err)
	}
	wellFormed(t, out.Bytes())
	for _, s := range []string{"first", "second", `y="400"`} {
		if !strings.Contains(out.String(), s) {
			t.Errorf("stacked chart lacks %q", s)
		}
	}
	if err := Stack(&out); !errors.Is(err, ErrNoData) {
		t.Errorf("no charts: err = %v, want ErrNoData", err)
	}
	if err := Stack(&out, []byte("<p/>")); err == nil {
		t.Error("a non-SVG chart was accepted")
	}
}
