// Command demo runs meshcrypt's main job on this machine: a real kube-apiserver and etcd, three
// nodes with two pods each as network namespaces, one agent per node; it sends marked traffic
// between every cross-node pod pair in clear (the capture of the underlay shows the marker),
// turns WireGuard on, sends it again (the capture shows none of it), and prints
// `meshcrypt status`. It cleans everything up on exit; --keep waits for Ctrl-C first.
package main

import (
	"context"
	"flag"
	"fmt"
	"log/slog"
	"os"
	"os/signal"
	"syscall"
	"time"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/tests/cluster"
	"github.com/meshcrypt/meshcrypt/tests/netenv"
)

func main() {
	keep := flag.Bool("keep", false, "keep the cluster running until Ctrl-C")
	nodes := flag.Int("nodes", 3, "number of nodes")
	flag.Parse()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	if err := run(ctx, *nodes, *keep); err != nil {
		fmt.Fprintln(os.Stderr, "demo:", err)
		os.Exit(1)
	}
}

func step(format string, args ...any) { fmt.Printf("==> "+format+"\n", args...) }

func run(ctx context.Context, nodes int, keep bool) error {
	if os.Geteuid() != 0 {
		return fmt.Errorf("needs root: it creates network namespaces and WireGuard devices")
	}
	step("starting kube-apiserver + etcd and the underlay")
	c, err := cluster.Start(ctx, cluster.Options{
		Logger: slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err != nil {
		return err
	}
	defer func() {
		step("cleaning up: agents, WireGuard devices, namespaces, control plane")
		if err := c.Close(); err != nil {
			fmt.Fprintln(os.Stderr, "demo: cleanup:", err)
		}
	}()
	for i := 1; i <= nodes; i++ {
		n, err := c.AddNode(ctx, fmt.Sprintf("node%d", i))
		if err != nil {
			return err
		}
		for j := 1; j <= 2; j++ {
			p, err := c.AddPod(ctx, n, fmt.Sprintf("node%d-pod%d", i, j))
			if err != nil {
				return err
			}
			step("node %s (underlay %s, pod CIDRs %v): pod %s %v", n.Name, n.UnderlayV4, n.PodCIDRs, p.Name, p.Addrs())
		}
	}
	if _, err := c.WaitConverged(ctx, v1alpha1.ModeDisabled, time.Minute); err != nil {
		return err
	}

	marker := []byte("MESHCRYPT-DEMO-SECRET")
	step("encryption Disabled: every cross-node pod pair exchanges %q over TCP and UDP", marker)
	if err := traffic(ctx, c, marker); err != nil {
		return err
	}

	step("meshcrypt encryption enable --mode wireguard --wait")
	out, err := c.Run(ctx, "meshcrypt", "encryption", "enable", "--mode", "wireguard", "--wait", "--timeout", "1m")
	fmt.Print(out)
	if err != nil {
		return fmt.Errorf("meshcrypt encryption enable: %w", err)
	}
	step("encryption WireGuard: the same traffic again")
	if err := traffic(ctx, c, marker); err != nil {
		return err
	}
	time.Sleep(1500 * time.Millisecond) // agents publish handshakes every second here
	step("meshcrypt status")
	out, err = c.Run(ctx, "meshcrypt", "status")
	fmt.Print(out)
	if err != nil {
		return fmt.Errorf("meshcrypt status: %w", err)
	}
	if keep {
		kc, _ := c.Kubeconfig()
		step("cluster is up. Try: %s --kubeconfig %s status", c.Bin("meshcrypt"), kc)
		step("agent logs under %s; Ctrl-C to stop", c.Nodes()[0].LogPath)
		<-ctx.Done()
	}
	return nil
}

// traffic exchanges marker between every cross-node pod pair while capturing the underlay,
// and prints what the capture saw.
func traffic(ctx context.Context, c *cluster.Cluster, marker []byte) error {
	cp, err := c.Net.CaptureUnderlay(netenv.CaptureOptions{Markers: [][]byte{marker}})
	if err != nil {
		return err
	}
	defer cp.Stop()
	var pods []*netenv.Pod
	for _, n := range c.Nodes() {
		pods = append(pods, n.Pods()...)
	}
	exchanges := 0
	for _, a := range pods {
		for _, b := range pods {
			if a.Node.Name == b.Node.Name {
				continue
			}
			for _, dst := range b.Addrs() {
				for _, proto := range []string{"tcp", "udp"} {
					if err := cluster.Exchange(ctx, proto, a, dst, b, 8080, marker, 20*time.Second); err != nil {
						return err
					}
					exchanges++
				}
			}
		}
	}
	st := cp.Stats()
	fmt.Printf("    %d exchanges; underlay capture: %d frames, %d WireGuard (udp/%d), marker in clear in %d frames\n",
		exchanges, st.Frames, cp.UDPFrames(51871), 51871, cp.Count(marker))
	return nil
}
