package vm_test

import (
	"context"
	"log/slog"
	"testing"
	"time"

	"github.com/meshcrypt/meshcrypt/tests/vm"
)

// kernelSuite are the package tests that run in the VM: the packages that
// touch the kernel. TestDeps needs the go command and the source tree,
// which the VM lacks; it runs on the host (make test-unit).
var kernelSuite = []vm.Test{
	{
		Package: "pkg/crypto/wireguard",
		Args:    []string{"-test.skip=^TestDeps$"},
		MustRun: []string{"TestKernelDevice", "TestKernelBackendDetection", "TestUserspaceTunnel", "TestApplyPromptStartsHandshake/kernel"},
	},
	{
		Package: "pkg/crypto/ipsec",
		Args:    []string{"-test.skip=^TestDeps$"},
		MustRun: []string{"TestSupported", "TestESPTunnel/underlay-ipv4", "TestESPTunnel/underlay-ipv6", "TestESPRotation", "TestESPReboot"},
	},
	{
		Package: "pkg/datapath",
		MustRun: []string{"TestRoutesApply", "TestPodLink", "TestClassifierVerdicts", "TestClassifierMatchesModel",
			"TestClassifierAttach/tc", "TestClassifierSurvivesRestart/tc", "TestClassifierChains",
			"TestClassifierConnectionsMatchModel", "TestConntrackReplies", "TestConntrackFull", "TestConntrackSurvivesReload"},
	},
}

// TestKernelSuite boots the Debian cloud kernel (kernel WireGuard, ESP,
// legacy tc) and runs the kernel-facing package tests inside it, reporting
// each inner test as a subtest.
func TestKernelSuite(t *testing.T) {
	if testing.Short() {
		t.Skip("boots a VM (minutes under TCG)")
	}
	ctx, cancel := context.WithTimeout(t.Context(), 12*time.Minute)
	defer cancel()
	log := slog.New(slog.NewTextHandler(t.Output(), nil))
	img, err := vm.Build(ctx, vm.Options{Tests: kernelSuite, Logger: log})
	if err != nil {
		t.Fatal(err)
	}
	defer img.Close()
	t.Logf("image built in %s (go test -c %s): kernel %s (%s %s)", img.BuildTime.Round(time.Millisecond),
		img.CompileTime.Round(time.Millisecond), img.Kernel.Release, img.Kernel.Package, img.Kernel.Version)
	res, err := vm.Boot(ctx, img, vm.BootOptions{Progress: t.Output()})
	if err != nil {
		t.Fatal(err)
	}
	res.Report(t)
}
