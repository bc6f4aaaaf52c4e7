package vm_test

import (
	"context"
	"io"
	"log/slog"
	"regexp"
	"strconv"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/vm"
)

// benchMetric matches a custom metric of a benchmark result line: "1.23 ipsec/clear".
var benchMetric = regexp.MustCompile(`([0-9.e+-]+) ((?:clear|wireguard|ipsec)[-/][A-Za-z/]+)`)

// BenchmarkPodThroughputInVM runs tests/e2e BenchmarkPodThroughput inside the VM, where
// kernel WireGuard and IPsec (ESP) exist, and reports its metrics: pod-to-pod throughput with
// encryption off, WireGuard and IPsec, and their ratios. Under TCG the absolute figures mean
// little; the ratios are the result. `make bench` runs it on the first kernel of vmKernels
// (6.1), where docs/performance.md's figures were measured.
func BenchmarkPodThroughputInVM(b *testing.B) {
	ctx, cancel := context.WithTimeout(b.Context(), e2eBootTimeout+5*time.Minute)
	defer cancel()
	res, _, err := bootE2E(ctx, b, vmKernels[0], vm.Test{Package: "tests/e2e", Run: "^$", Timeout: e2eTestTimeout,
		Args: []string{"-test.bench=^BenchmarkPodThroughput$", "-test.benchtime=1x"}},
		[]string{"ip", "iperf3"}, slog.New(slog.DiscardHandler), io.Discard)
	if err != nil {
		b.Fatal(err)
	}
	out := res.Binary("tests/e2e")
	if out == nil || !out.Ended || out.Exit != 0 {
		b.Fatalf("the benchmark failed in the VM: %+v", res.Problems())
	}
	for _, l := range regexp.MustCompile(`[^\n]*Gbit/s[^\n]*`).FindAllString(string(out.Output), -1) {
		b.Log(l)
	}
	found := map[string]bool{}
	for _, m := range benchMetric.FindAllStringSubmatch(string(out.Output), -1) {
		v, err := strconv.ParseFloat(m[1], 64)
		if err != nil || found[m[2]] {
			continue
		}
		found[m[2]] = true
		b.ReportMetric(v, m[2])
	}
	if !found["ipsec/clear"] || !found["wireguard/clear"] {
		b.Fatalf("no throughput ratios in the VM's output:\n%s", out.Output)
	}
}
