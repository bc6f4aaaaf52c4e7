package main

import (
	"context"
	"strings"
	"time"

	"github.com/spf13/cobra"
	corev1 "k8s.io/api/core/v1"
	"sigs.k8s.io/controller-runtime/pkg/client"
)

// completionTimeout bounds the API calls of a dynamic completion: a shell waiting on an
// unreachable cluster is worse than no suggestions.
const completionTimeout = 5 * time.Second

// completeFromCluster completes a flag's value from names that list reads from the cluster
// (with the command line's --kubeconfig and --context), keeping those that start with what
// was typed. Any error means no suggestions, never a file name.
func completeFromCluster(g *globals, list func(ctx context.Context, c client.Client, toComplete string) ([]string, error)) cobra.CompletionFunc {
	return func(cmd *cobra.Command, _ []string, toComplete string) ([]cobra.Completion, cobra.ShellCompDirective) {
		c, err := g.client()
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
		}
		ctx, cancel := context.WithTimeout(cmd.Context(), completionTimeout)
		defer cancel()
		names, err := list(ctx, c, toComplete)
		if err != nil {
			return nil, cobra.ShellCompDirectiveNoFileComp | cobra.ShellCompDirectiveError
		}
		var out []cobra.Completion
		directive := cobra.ShellCompDirectiveNoFileComp
		for _, n := range names {
			if strings.HasPrefix(n, toComplete) {
				out = append(out, n)
				if strings.HasSuffix(n, "/") {
					directive |= cobra.ShellCompDirectiveNoSpace // more to type after NAMESPACE/
				}
			}
		}
		return out, directive
	}
}

// completeNodes completes a flag that takes a Kubernetes node name.
func completeNodes(g *globals) cobra.CompletionFunc {
	return completeFromCluster(g, func(ctx context.Context, c client.Client, _ string) ([]string, error) {
		return nodeNames(ctx, c)
	})
}

// completePods completes a flag that takes a pod as NAMESPACE/NAME: namespaces (with a
// trailing slash) until one is typed, then the pods of that namespace.
func completePods(g *globals) cobra.CompletionFunc {
	return completeFromCluster(g, func(ctx context.Context, c client.Client, toComplete string) ([]string, error) {
		ns, _, typed := strings.Cut(toComplete, "/")
		if !typed {
			var list corev1.NamespaceList
			if err := c.List(ctx, &list); err != nil {
				return nil, err
			}
			out := make([]string, len(list.Items))
			for i, n := range list.Items {
				out[i] = n.Name + "/"
			}
			return out, nil
		}
		var list corev1.PodList
		if err := c.List(ctx, &list, client.InNamespace(ns)); err != nil {
			return nil, err
		}
		out := make([]string, len(list.Items))
		for i, p := range list.Items {
			out[i] = ns + "/" + p.Name
		}
		return out, nil
	})
}
