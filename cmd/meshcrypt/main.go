// Command meshcrypt is the operator CLI: encryption status of the cluster and, as it grows,
// the switches and key rotation. Installed as kubectl-meshcrypt it is a kubectl plugin: its
// help then says `kubectl meshcrypt`.
//
// Exit status: 0 success (for status: compliant), 1 a negative verdict the command printed
// (status: not compliant; policy check: denied), 2 any error (bad input, no kubeconfig, API
// server unreachable, missing RBAC permissions).
package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"

	"github.com/spf13/cobra"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/client-go/kubernetes"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/clientcmd"
	"sigs.k8s.io/controller-runtime/pkg/client"

	"github.com/meshcrypt/meshcrypt/pkg/api/v1alpha1"
)

func main() {
	os.Exit(run(newRootCmd(), os.Args[1:], os.Stdout, os.Stderr))
}

// run executes the CLI with args and returns the exit status; errors are described on
// stderr, prefixed with the command's name.
func run(root *cobra.Command, args []string, stdout, stderr io.Writer) int {
	root.SetArgs(args)
	root.SetOut(stdout)
	root.SetErr(stderr)
	err := root.Execute()
	if exitCode(err) == exitError {
		fmt.Fprintf(stderr, "%s: %s\n", root.DisplayName(), describe(err))
	}
	return exitCode(err)
}

// globals are the flags every subcommand shares.
type globals struct {
	kubeconfig string
	context    string
}

// restConfig loads the kubeconfig the way kubectl does: --kubeconfig, else $KUBECONFIG, else
// ~/.kube/config, else the in-cluster config of a pod; --context picks a context.
func (g *globals) restConfig() (*rest.Config, error) {
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = g.kubeconfig
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: g.context})
	cfg, err := cc.ClientConfig()
	if err != nil {
		return nil, kubeconfigError(cc, g, err)
	}
	cfg.UserAgent = "meshcrypt-cli"
	markAPIServerErrors(cfg)
	return cfg, nil
}

// clientset is a typed client-go clientset for the built-in APIs.
func (g *globals) clientset() (kubernetes.Interface, error) {
	cfg, err := g.restConfig()
	if err != nil {
		return nil, err
	}
	return kubernetes.NewForConfig(cfg)
}

func (g *globals) client() (client.Client, error) {
	cfg, err := g.restConfig()
	if err != nil {
		return nil, err
	}
	return newClient(cfg)
}

// newClient is a client for cfg that knows the built-in and meshcrypt.io types.
func newClient(cfg *rest.Config) (client.Client, error) {
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

// newRootCmd is the CLI named after the program's name (argv[0]).
func newRootCmd() *cobra.Command { return newRootCmdAs(os.Args[0]) }

// newRootCmdAs is the CLI named after program: help texts say `meshcrypt`, or `kubectl
// meshcrypt` when program is kubectl-meshcrypt (kubectl runs plugins by that name).
func newRootCmdAs(program string) *cobra.Command {
	g := &globals{}
	name, display := commandName(program)
	cmd := &cobra.Command{
		Use:   name,
		Short: "meshcrypt: transparent encryption for Kubernetes pod traffic",
		Long: `meshcrypt: transparent encryption for Kubernetes pod traffic.

It reads the kubeconfig as kubectl does: --kubeconfig, else $KUBECONFIG, else ~/.kube/config,
else a pod's ServiceAccount; --context picks a context. Installed as kubectl-meshcrypt on the
PATH it is also the kubectl plugin "kubectl meshcrypt".

Exit status: 0 success (status: compliant), 1 a negative verdict the command printed (status:
NOT compliant; policy check: denied), 2 an error (bad input, cluster unreachable, missing
permissions).`,
		Annotations:   map[string]string{cobra.CommandDisplayNameAnnotation: display},
		SilenceUsage:  true,
		SilenceErrors: true,
	}
	cmd.PersistentFlags().StringVar(&g.kubeconfig, "kubeconfig", "", "kubeconfig file (default $KUBECONFIG or ~/.kube/config)")
	cmd.PersistentFlags().StringVar(&g.context, "context", "", "kubeconfig context to use")
	cmd.AddCommand(newStatusCmd(g), newEncryptionCmd(g), newIdentitiesCmd(g), newPolicyCmd(g))
	cmd.AddCommand(newMonitorCmd(g))
	cmd.AddCommand(newKeysCmd(g))
	cmd.AddCommand(newVerifyCmd(g))
	cmd.AddCommand(newClustermeshCmd(g))
	return cmd
}

// commandName derives the command's name from the program's path: the file name, and, for a
// kubectl plugin (kubectl-NAME), the name kubectl shows it under ("kubectl NAME"; dashes in
// NAME are spaces there and underscores dashes, as kubectl maps them).
func commandName(program string) (name, display string) {
	name = filepath.Base(program)
	if name == "" || name == "." || name == string(filepath.Separator) {
		name = "meshcrypt"
	}
	if plugin, ok := strings.CutPrefix(name, "kubectl-"); ok && plugin != "" {
		plugin = strings.ReplaceAll(strings.ReplaceAll(plugin, "-", " "), "_", "-")
		return name, "kubectl " + plugin
	}
	return name, name
}
