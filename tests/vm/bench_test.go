package vm_test

import (
	"context"
	"fmt"
	"log/slog"
	"net/url"
	"regexp"
	"strconv"
	"sync"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/controlplane"
	"github.com/meshcrypt/meshcrypt/tests/vm"
)

// benchMetric matches a custom metric of a benchmark result line: "1.23 ipsec/clear".
var benchMetric = regexp.MustCompile(`([0-9.e+-]+) ((?:clear|wireguard|ipsec)[-/][A-Za-z/]+)`)

// BenchmarkPodThroughputInVM runs tests/e2e BenchmarkPodThroughput inside the VM, where
// kernel WireGuard and IPsec (ESP) exist, and reports its metrics: pod-to-pod throughput with
// encryption off, WireGuard and IPsec, and their ratios. Under TCG the absolute figures mean
// little; the ratios are the result. `make bench` runs it.
func BenchmarkPodThroughputInVM(b *testing.B) {
	ctx, cancel := context.WithTimeout(b.Context(), e2eBootTimeout+5*time.Minute)
	defer cancel()
	var (
		img    *vm.Image
		imgErr error
		wg     sync.WaitGroup
	)
	wg.Go(func() {
		img, imgErr = vm.Build(ctx, vm.Options{
			Tests: []vm.Test{{Package: "tests/e2e", Run: "^$", Timeout: e2eTestTimeout,
				Args: []string{"-test.bench=^BenchmarkPodThroughput$", "-test.benchtime=1x"}}},
			Programs:     []string{"cmd/meshcrypt-agent", "cmd/meshcrypt"},
			HostPrograms: []string{"ip", "iperf3"},
			Logger:       slog.New(slog.DiscardHandler),
		})
	})
	cp := controlplane.StartT(b, controlplane.Options{})
	applyErr := cluster.ApplyManifests(ctx, cp)
	wg.Wait()
	if imgErr != nil {
		b.Fatal(imgErr)
	}
	defer img.Close()
	if applyErr != nil {
		b.Fatal(applyErr)
	}
	u, err := url.Parse(cp.URL())
	if err != nil {
		b.Fatal(err)
	}
	kc, err := cp.Kubeconfig(fmt.Sprintf("https://%s:%s", vm.HostAddr, u.Port()), cp.AdminToken())
	if err != nil {
		b.Fatal(err)
	}
	res, err := vm.Boot(ctx, img, vm.BootOptions{
		Network: true,
		Memory:  2048,
		Timeout: e2eBootTimeout,
		Files:   []vm.File{{Path: e2eGuestKubeconfig, Data: kc, Mode: 0o600}},
		Env:     map[string]string{cluster.KubeconfigEnv: e2eGuestKubeconfig, "MESHCRYPT_BIN_DIR": vm.ProgramDir},
	})
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
