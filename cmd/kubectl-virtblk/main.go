// Command kubectl-virtblk is a kubectl plugin for looking at virtblk VMs
// from outside the pod:
//
//	kubectl virtblk inspect VM [-n NS]        disks, queues, queue->IOThread map, pinning
//	kubectl virtblk qemu-cmdline VM [--match S] QEMU's command line, one option per line
//	kubectl virtblk stats VM                  the virtblk back-end's metrics for served disks
//
// Put the binary on PATH; kubectl finds it by its name.
package main

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/spf13/pflag"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/kubernetes"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/virtblk/virtblk/cmd/kubectl-virtblk/internal/launcher"
)

const usage = `Usage: kubectl virtblk COMMAND VM [flags]

Commands:
  inspect VM        disks of the running domain (virsh dumpxml in the compute
                    container): bus, type, source, queues, queue->IOThread map,
                    IOThread pinning
  qemu-cmdline VM   QEMU's command line, one option per line
                    (--match iothread shows the IOThreads and vq mappings)
  stats VM          the virtblk back-end's metrics for disks it serves

Flags:
`

func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		fmt.Fprintln(os.Stderr, "kubectl-virtblk:", err)
		os.Exit(1)
	}
}

// args is a parsed command line.
type args struct {
	command, vm           string
	namespace, kubeconfig string
	context, match        string
	help                  bool
}

var errUsage = errors.New("usage")

func parseArgs(argv []string, stderr io.Writer) (args, error) {
	var a args
	fs := pflag.NewFlagSet("kubectl-virtblk", pflag.ContinueOnError)
	fs.SetOutput(stderr)
	fs.StringVarP(&a.namespace, "namespace", "n", "", "namespace of the VM (default: the kubeconfig context's)")
	fs.StringVar(&a.kubeconfig, "kubeconfig", "", "kubeconfig file (default: $KUBECONFIG or ~/.kube/config)")
	fs.StringVar(&a.context, "context", "", "kubeconfig context to use")
	fs.StringVar(&a.match, "match", "", "qemu-cmdline: only options containing this text")
	fs.BoolVarP(&a.help, "help", "h", false, "show this help")
	fs.Usage = func() { fmt.Fprint(stderr, usage+fs.FlagUsages()) }
	if err := fs.Parse(argv); err != nil {
		return a, err
	}
	if a.help {
		fs.Usage()
		return a, errUsage
	}
	rest := fs.Args()
	if len(rest) != 2 {
		fs.Usage()
		return a, fmt.Errorf("want a command and a VM name, got %q", rest)
	}
	a.command, a.vm = rest[0], rest[1]
	switch a.command {
	case "inspect", "qemu-cmdline", "stats":
	default:
		fs.Usage()
		return a, fmt.Errorf("unknown command %q: want inspect, qemu-cmdline or stats", a.command)
	}
	if a.match != "" && a.command != "qemu-cmdline" {
		return a, errors.New("--match only applies to qemu-cmdline")
	}
	return a, nil
}

func run(ctx context.Context, argv []string, stdout, stderr io.Writer) error {
	a, err := parseArgs(argv, stderr)
	if errors.Is(err, errUsage) {
		return nil
	}
	if err != nil {
		return err
	}

	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	rules.ExplicitPath = a.kubeconfig
	cc := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{CurrentContext: a.context})
	cfg, err := cc.ClientConfig()
	if err != nil {
		return fmt.Errorf("load kubeconfig: %w", err)
	}
	ns := a.namespace
	if ns == "" {
		if ns, _, err = cc.Namespace(); err != nil {
			return fmt.Errorf("namespace from kubeconfig: %w", err)
		}
	}
	client, err := kubernetes.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("kubernetes client: %w", err)
	}
	dyn, err := dynamic.NewForConfig(cfg)
	if err != nil {
		return fmt.Errorf("dynamic client: %w", err)
	}
	d := launcher.Deps{
		Client:  client,
		Exec:    launcher.RemoteExecutor{Config: cfg, REST: client.CoreV1().RESTClient()},
		Metrics: launcher.ProxyMetrics{Client: client},
		VMIs:    launcher.DynamicVMIs{Client: dyn},
	}
	switch a.command {
	case "inspect":
		return launcher.Inspect(ctx, d, ns, a.vm, stdout)
	case "qemu-cmdline":
		return launcher.Cmdline(ctx, d, ns, a.vm, a.match, stdout)
	default:
		return launcher.Stats(ctx, d, ns, a.vm, stdout)
	}
}
