// Command meshcrypt is the operator CLI: encryption status of the cluster and, as it grows,
// the switches and key rotation. Installed as kubectl-meshcrypt it is a kubectl plugin.
package main

import (
	"errors"
	"fmt"
	"os"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

func main() {
	if err := newRootCmd().Execute(); err != nil {
		if !errors.Is(err, errVerdict) {
			fmt.Fprintln(os.Stderr, "meshcrypt:", err)
		}
		os.Exit(1)
	}
}

// globals are the flags every subcommand shares.
type globals struct {
	kubeconfig string
	context    string
}

func (g *globals) restConfig() (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = g.kubeconfig
	cfg, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules,
		&clientcmd.ConfigOverrides{CurrentContext: g.context}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("load kubeconfig: %w", err)
	}
	cfg.UserAgent = "meshcrypt-cli"
	return cfg, nil
}

func (g *globals) client() (client.Client, error) {
	cfg, err := g.restConfig()
	if err != nil {
		return nil, err
	}
	scheme := runtime.NewScheme()
	if err := clientgoscheme.AddToScheme(scheme); err != nil {
		return nil, err
	}
	if err := v1alpha1.AddToScheme(scheme); err != nil {
		return nil, err
	}
	c, err := client.New(cfg, client.Options{Scheme: scheme})
	if err != nil {
		return nil, fmt.Errorf("connect to %s: %w", cfg.Host, err)
	}
	return c, nil
}

func newRootCmd() *cobra.Command {
	g := &globals{}
	cmd := &cobra.Command{
		Use:           "meshcrypt",
		Short:         "meshcrypt: transparent encryption for Kubernetes pod traffic",
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.PersistentFlags().StringVar(&g.kubeconfig, "kubeconfig", "", "kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
	cmd.PersistentFlags().StringVar(&g.context, "context", "", "kubeconfig context to use")
	cmd.AddCommand(newStatusCmd(g), newEncryptionCmd(g), newIdentitiesCmd(g), newPolicyCmd(g))
	return cmd
}
