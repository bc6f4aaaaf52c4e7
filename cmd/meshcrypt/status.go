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
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/status"
)

func newStatusCmd(g *globals) *cobra.Command {
	var output, node string
	cmd := &cobra.Command{
		Use:   "status [--node NAME] [-o table|json|yaml]",
		Short: "show the encryption mode, every node and whether every node pair is encrypted",
		Long: `Prints the verdict first (compliant or NOT compliant, and why), then one row per node and one
per node pair. A pair is encrypted when both nodes have applied the cluster's mode (and strict
mode, when it is on) and each has configured the other with the public key the other
announces, as read back from its WireGuard device. A Kubernetes node without a MeshNode (no
agent runs there) makes each of its pairs unencrypted. --node limits the report and the
verdict to one node's pairs.

Exit status, for audit jobs:
  0  compliant: encryption is on and every node pair is encrypted
  1  NOT compliant: the verdict line says why (also with -o json or -o yaml)
  2  the status could not be read: no kubeconfig, API server unreachable, missing
     permissions, unknown node or bad flag

Permissions: get meshconfigs and list meshnodes (API group meshcrypt.io), list nodes.`,
		Args: cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if err := checkOutput(output); err != nil {
				return err
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			r, err := readStatus(cmd.Context(), c)
			if err != nil {
				return err
			}
			if node != "" {
				only, ok := r.Only(node)
				if !ok {
					names := make([]string, len(r.Nodes))
					for i, n := range r.Nodes {
						names[i] = n.Name
					}
					return nodeNotFound(node, names)
				}
				r = only
			}
			err = writeOutput(cmd.OutOrStdout(), output, r, func(w io.Writer) error { return r.WriteTable(w, time.Now()) })
			if err != nil {
				return err
			}
			if !r.Compliant {
				return errVerdict
			}
			return nil
		},
	}
	addOutputFlag(cmd, &output)
	cmd.Flags().StringVar(&node, "node", "", "report only this node and its pairs")
	_ = cmd.RegisterFlagCompletionFunc("node", completeNodes(g))
	return cmd
}

// readStatus reads the MeshConfig, the MeshNodes and the Nodes' names, and evaluates them.
func readStatus(ctx context.Context, c client.Client) (status.Report, error) {
	var cfg *v1alpha1.MeshConfig
	var mc v1alpha1.MeshConfig
	switch err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); {
	case err == nil:
		cfg = &mc
	case apierrors.IsNotFound(err):
	default:
		return status.Report{}, fmt.Errorf("get MeshConfig %s: %w", v1alpha1.MeshConfigName, err)
	}
	var meshNodes v1alpha1.MeshNodeList
	if err := c.List(ctx, &meshNodes); err != nil {
		return status.Report{}, fmt.Errorf("list MeshNodes: %w", err)
	}
	labels, err := nodeLabels(ctx, c)
	if err != nil {
		return status.Report{}, err
	}
	names := slices.Sorted(maps.Keys(labels))
	return status.Evaluate(status.Input{Config: cfg, MeshNodes: meshNodes.Items, Nodes: names, NodeLabels: labels}), nil
}

// nodeNames lists the names of the cluster's Kubernetes nodes, sorted (metadata only).
func nodeNames(ctx context.Context, c client.Client) ([]string, error) {
	labels, err := nodeLabels(ctx, c)
	if err != nil {
		return nil, err
	}
	return slices.Sorted(maps.Keys(labels)), nil
}

// nodeLabels lists the cluster's Kubernetes nodes with their labels, by name (metadata only).
func nodeLabels(ctx context.Context, c client.Client) (map[string]map[string]string, error) {
	var list metav1.PartialObjectMetadataList
	list.SetGroupVersionKind(corev1.SchemeGroupVersion.WithKind("NodeList"))
	if err := c.List(ctx, &list); err != nil {
		return nil, fmt.Errorf("list Nodes: %w", err)
	}
	out := make(map[string]map[string]string, len(list.Items))
	for i := range list.Items {
		out[list.Items[i].Name] = list.Items[i].Labels
	}
	return out, nil
}

// nodeNotFound is the error for a node name the cluster does not have.
func nodeNotFound(name string, known []string) error {
	if len(known) == 0 {
		return fmt.Errorf("node %q not found: the cluster has no nodes", name)
	}
	const show = 10
	list := strings.Join(known[:min(len(known), show)], ", ")
	if len(known) > show {
		list += fmt.Sprintf(", ... (%d in all)", len(known))
	}
	return fmt.Errorf("node %q not found: the cluster's nodes are %s", name, list)
}
