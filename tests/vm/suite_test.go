package vm_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/vm"
)

// kernelSuite returns the package tests that run in the VM on k: the
// packages that touch the kernel, and the harness's check of the guest
// (modules loaded, autoloaded through busybox's modprobe, ESP with GCM).
// TestDeps needs the go command and the source tree, which the VM lacks; it
// runs on the host (make test-unit). Every test that needs a kernel feature
// k has is in MustRun: it may not skip there.
func kernelSuite(k vmKernel) []vm.Test {
	datapath := []string{"TestRoutesApply", "TestPodLink", "TestClassifierVerdicts", "TestClassifierMatchesModel",
		"TestClassifierAttach/auto", "TestClassifierAttach/tc", "TestClassifierSurvivesRestart/tc", "TestClassifierChains/tc",
		"TestClassifierConnectionsMatchModel", "TestConntrackReplies", "TestConntrackFull", "TestConntrackSurvivesReload"}
	if k.Attach == "tcx" {
		datapath = append(datapath, "TestClassifierAttach/tcx", "TestClassifierSurvivesRestart/tcx", "TestClassifierChains/tcx",
			"TestClassifierAttachSwitchMode", "TestClassifierStaleLinkPin", "TestClassifierPruneUnpinned")
	}
	return []vm.Test{
		{
			Package: "tests/vm/internal/selftest",
			Run:     vm.RunOnly("TestGuest"),
			// ip-netns needs iproute2's ip (HostPrograms), which this image
			// leaves out; the e2e boot uses it.
			Args:    []string{"-test.skip=^TestGuest/ip-netns$"},
			MustRun: []string{"TestGuest/mounts", "TestGuest/modules", "TestGuest/autoload", "TestGuest/esp-gcm"},
		},
		{
			Package: "pkg/crypto/wireguard",
			Args:    []string{"-test.skip=^TestDeps$"},
			MustRun: []string{"TestKernelDevice", "TestKernelBackendDetection", "TestUserspaceTunnel", "TestApplyPromptStartsHandshake/kernel"},
		},
		{
			Package: "pkg/crypto/ipsec",
			Args:    []string{"-test.skip=^TestDeps$"},
			MustRun: []string{"TestSupported", "TestESPTunnel/underlay-ipv4", "TestESPTunnel/underlay-ipv6", "TestESPRotation", "TestESPReboot",
				"TestReadXfrmStat"},
		},
		{
			Package: "pkg/datapath",
			MustRun: datapath,
		},
	}
}

// TestKernelSuite boots each Debian cloud kernel of vmKernels (kernel
// WireGuard, ESP, and legacy tc on 6.1, TCX on 6.12) and runs the
// kernel-facing package tests inside it, reporting each inner test as a
// subtest: TestKernelSuite/6.12/pkg/datapath/TestClassifierAttach/tcx.
func TestKernelSuite(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM (minutes under TCG)")
	}
	forEachKernel(t, func(t *testing.T, k vmKernel) {
		start := time.Now()
		ctx, cancel := context.WithTimeout(t.Context(), 12*time.Minute)
		defer cancel()
		log := slog.New(slog.NewTextHandler(t.Output(), nil))
		img, err := vm.Build(ctx, vm.Options{Tests: kernelSuite(k), Kernel: k.Kernel, Logger: log})
		if err != nil {
			t.Fatal(err)
		}
		defer img.Close()
		k.checkRelease(t, img)
		t.Logf("image built in %s (go test -c %s): kernel %s (%s %s)", img.BuildTime.Round(time.Millisecond),
			img.CompileTime.Round(time.Millisecond), img.Kernel.Release, img.Kernel.Package, img.Kernel.Version)
		res, err := vm.Boot(ctx, img, vm.BootOptions{Env: k.env(), Progress: t.Output()})
		if err != nil {
			t.Fatal(err)
		}
		res.Report(t)
		t.Logf("TestKernelSuite on %s: %s in all", k.Name, time.Since(start).Round(time.Millisecond))
	})
}
