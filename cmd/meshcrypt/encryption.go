package main

import (
	"context"
	"fmt"
	"io"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/client-go/util/retry"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/status"
)

// modes maps the CLI's lowercase mode names to the API's.
var modes = map[string]v1alpha1.EncryptionMode{
	"wireguard": v1alpha1.ModeWireGuard,
	"ipsec":     v1alpha1.ModeIPsec,
}

// modeNames are the values --mode takes, sorted.
func modeNames() []string {
	return slices.Sorted(maps.Keys(modes))
}

func parseMode(s string) (v1alpha1.EncryptionMode, error) {
	if m, ok := modes[strings.ToLower(s)]; ok {
		return m, nil
	}
	valid := strings.Join(modeNames(), ", ")
	switch strings.ToLower(s) {
	case "disabled", "none", "off":
		return "", fmt.Errorf("--mode %s: to turn encryption off, use the `encryption disable` command (valid modes: %s)", s, valid)
	}
	return "", fmt.Errorf("--mode %q: unknown mode (valid modes: %s)", s, valid)
}

type waitFlags struct {
	wait    bool
	timeout time.Duration
}

func (w *waitFlags) register(cmd *cobra.Command) {
	cmd.Flags().BoolVar(&w.wait, "wait", false, "wait until every node has applied the change, showing per-node progress")
	cmd.Flags().DurationVar(&w.timeout, "timeout", 5*time.Minute, "how long --wait waits")
}

func newEncryptionCmd(g *globals) *cobra.Command {
	cmd := &cobra.Command{
		Use:   "encryption",
		Short: "turn encryption of pod traffic between nodes on or off for the whole cluster",
	}
	var mode string
	var strict bool
	var wf waitFlags
	enable := &cobra.Command{
		Use:   "enable --mode wireguard|ipsec [--strict] [--wait]",
		Short: "encrypt pod traffic between nodes",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			m, err := parseMode(mode)
			if err != nil {
				return err
			}
			return setMode(cmd.Context(), g, cmd.OutOrStdout(), m, strict, wf)
		},
	}
	enable.Flags().StringVar(&mode, "mode", "", "encryption mode: "+strings.Join(modeNames(), ", "))
	_ = enable.RegisterFlagCompletionFunc("mode", cobra.FixedCompletions(modeNames(), cobra.ShellCompDirectiveNoFileComp))
	enable.Flags().BoolVar(&strict, "strict", false, "drop, never send in clear, pod traffic to nodes whose tunnel is not ready")
	_ = enable.MarkFlagRequired("mode")
	wf.register(enable)
	var dwf waitFlags
	disable := &cobra.Command{
		Use:   "disable [--wait]",
		Short: "send pod traffic between nodes in clear (removes every tunnel)",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			return setMode(cmd.Context(), g, cmd.OutOrStdout(), v1alpha1.ModeDisabled, false, dwf)
		},
	}
	dwf.register(disable)
	cmd.AddCommand(enable, disable)
	return cmd
}

// setMode writes the mode into the MeshConfig (creating it if needed) and, with --wait,
// follows every node until it has applied it.
func setMode(ctx context.Context, g *globals, out io.Writer, mode v1alpha1.EncryptionMode, strict bool, wf waitFlags) error {
	c, err := g.client()
	if err != nil {
		return err
	}
	var previous v1alpha1.EncryptionMode
	err = retry.RetryOnConflict(retry.DefaultRetry, func() error {
		var mc v1alpha1.MeshConfig
		err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc)
		if apierrors.IsNotFound(err) {
			previous = v1alpha1.ModeDisabled
			mc = v1alpha1.MeshConfig{ObjectMeta: metav1.ObjectMeta{Name: v1alpha1.MeshConfigName}}
			mc.Spec.Encryption.Mode = mode
			mc.Spec.Encryption.Strict = strict
			return c.Create(ctx, &mc)
		}
		if err != nil {
			return err
		}
		previous = mc.Spec.Encryption.Mode
		mc.Spec.Encryption.Mode = mode
		mc.Spec.Encryption.Strict = strict
		return c.Update(ctx, &mc)
	})
	if err != nil {
		return fmt.Errorf("set MeshConfig %s mode %s: %w", v1alpha1.MeshConfigName, mode, err)
	}
	if strict {
		fmt.Fprintf(out, "encryption mode %s -> %s (strict)\n", previous, mode)
	} else {
		fmt.Fprintf(out, "encryption mode %s -> %s\n", previous, mode)
	}
	if !wf.wait {
		return nil
	}
	return waitForMode(ctx, c, out, mode, wf.timeout)
}

// waitForMode polls the MeshNodes until every node has applied mode, printing each node's
// progress when it changes.
func waitForMode(ctx context.Context, c client.Client, out io.Writer, mode v1alpha1.EncryptionMode, timeout time.Duration) error {
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	start := time.Now()
	shown := map[string]string{}
	tick := time.NewTicker(500 * time.Millisecond)
	defer tick.Stop()
	for {
		var list v1alpha1.MeshNodeList
		if err := c.List(ctx, &list); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("timed out after %s waiting for nodes to apply %s", timeout, mode)
			}
			return fmt.Errorf("list MeshNodes: %w", err)
		}
		var nodes corev1.NodeList
		if err := c.List(ctx, &nodes); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("timed out after %s waiting for nodes to apply %s", timeout, mode)
			}
			return fmt.Errorf("list Nodes: %w", err)
		}
		expected := make([]string, len(nodes.Items))
		for i, n := range nodes.Items {
			expected[i] = n.Name
		}
		prog := status.Progress(mode, list.Items, expected)
		done := 0
		for _, p := range prog {
			line := "waiting: " + p.Waiting
			if p.Done {
				line = "done"
				done++
			}
			if shown[p.Node] != line {
				shown[p.Node] = line
				fmt.Fprintf(out, "  %-20s %s\n", p.Node, line)
			}
		}
		if done == len(prog) {
			fmt.Fprintf(out, "all %d nodes applied %s in %s\n", done, mode, time.Since(start).Round(time.Millisecond))
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("timed out after %s: %d of %d nodes applied %s", timeout, done, len(prog), mode)
		case <-tick.C:
		}
	}
}
