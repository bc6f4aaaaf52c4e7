package main

import (
	"fmt"
	"time"

	"github.com/spf13/cobra"
	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
	"github.com/meshcrypt/meshcrypt/pkg/status"
)

func newStatusCmd(g *globals) *cobra.Command {
	var output string
	cmd := &cobra.Command{
		Use:   "status",
		Short: "show the encryption mode, every node and whether every node pair is encrypted",
		Args:  cobra.NoArgs,
		RunE: func(cmd *cobra.Command, _ []string) error {
			if output != "table" && output != "json" {
				return fmt.Errorf("-o %q: want table or json", output)
			}
			c, err := g.client()
			if err != nil {
				return err
			}
			ctx := cmd.Context()
			var cfg *v1alpha1.MeshConfig
			var mc v1alpha1.MeshConfig
			switch err := c.Get(ctx, client.ObjectKey{Name: v1alpha1.MeshConfigName}, &mc); {
			case err == nil:
				cfg = &mc
			case apierrors.IsNotFound(err):
			default:
				return fmt.Errorf("get MeshConfig: %w", err)
			}
			var nodes v1alpha1.MeshNodeList
			if err := c.List(ctx, &nodes); err != nil {
				return fmt.Errorf("list MeshNodes: %w", err)
			}
			r := status.Compute(cfg, nodes.Items)
			if output == "json" {
				return r.WriteJSON(cmd.OutOrStdout())
			}
			return r.WriteTable(cmd.OutOrStdout(), time.Now())
		},
	}
	cmd.Flags().StringVarP(&output, "output", "o", "table", "output format: table or json")
	return cmd
}
