package xmltree

import (
	"fmt"
	"sort"
	"strings"
)

// KeyFunc names a child among its same-named siblings so that a diff can
// match it across two trees regardless of position (a disk by its alias, an
// iothread by its id). Returning "" falls back to the sibling index.
type KeyFunc func(n *Node) string

// Diff lists the differences from a to b, one line each, sorted:
//
//   - /path                     element only in b
//   - /path                     element only in a
//   - /path@attr=value          attribute only in b
//   - /path@attr=value          attribute only in a
//     ~ /path@attr: old -> new    attribute changed
//     ~ /path#text: old -> new    character data changed
//     order /path/name: [..] -> [..]  same-named siblings present in both, reordered
//
// Children of different names are compared as sets: libvirt and libvirtxml
// both impose their own element order, which carries no meaning, while the
// order of same-named siblings (disks, controllers) does.
func Diff(a, b *Node, key KeyFunc) []string {
	var out []string
	if a.Name != b.Name {
		return []string{fmt.Sprintf("- /%s", a.Name), fmt.Sprintf("+ /%s", b.Name)}
	}
	diffNode(&out, "/"+a.Name, a, b, key)
	sort.Strings(out)
	return out
}

func diffNode(out *[]string, path string, a, b *Node, key KeyFunc) {
	aa := attrMap(a)
	ba := attrMap(b)
	for _, k := range sortedKeys(aa) {
		bv, ok := ba[k]
		switch {
		case !ok:
			*out = append(*out, fmt.Sprintf("- %s@%s=%s", path, k, aa[k]))
		case bv != aa[k]:
			*out = append(*out, fmt.Sprintf("~ %s@%s: %s -> %s", path, k, aa[k], bv))
		}
	}
	for _, k := range sortedKeys(ba) {
		if _, ok := aa[k]; !ok {
			*out = append(*out, fmt.Sprintf("+ %s@%s=%s", path, k, ba[k]))
		}
	}
	if a.Text != b.Text {
		*out = append(*out, fmt.Sprintf("~ %s#text: %s -> %s", path, a.Text, b.Text))
	}
	ak, am := keyed(a, key)
	bk, bm := keyed(b, key)
	for _, k := range ak {
		if bn, ok := bm[k]; ok {
			diffNode(out, path+"/"+k, am[k], bn, key)
		} else {
			*out = append(*out, fmt.Sprintf("- %s/%s", path, k))
		}
	}
	for _, k := range bk {
		if _, ok := am[k]; !ok {
			*out = append(*out, fmt.Sprintf("+ %s/%s", path, k))
		}
	}
	// Relative order of same-named siblings present on both sides.
	for _, name := range childNames(a) {
		var ao, bo []string
		for _, k := range ak {
			if am[k].Name == name && bm[k] != nil {
				ao = append(ao, k)
			}
		}
		for _, k := range bk {
			if bm[k].Name == name && am[k] != nil {
				bo = append(bo, k)
			}
		}
		if strings.Join(ao, " ") != strings.Join(bo, " ") {
			*out = append(*out, fmt.Sprintf("order %s/%s: %v -> %v", path, name, ao, bo))
		}
	}
}

func attrMap(n *Node) map[string]string {
	m := make(map[string]string, len(n.Attrs))
	for _, a := range n.Attrs {
		m[AttrName(a)] = a.Value
	}
	return m
}

func sortedKeys(m map[string]string) []string {
	ks := make([]string, 0, len(m))
	for k := range m {
		ks = append(ks, k)
	}
	sort.Strings(ks)
	return ks
}

func childNames(n *Node) []string {
	seen := map[string]bool{}
	var out []string
	for _, c := range n.Children {
		if !seen[c.Name] {
			seen[c.Name] = true
			out = append(out, c.Name)
		}
	}
	return out
}

// keyed returns the children's path keys in document order and a lookup.
func keyed(n *Node, key KeyFunc) ([]string, map[string]*Node) {
	idx := map[string]int{}
	m := make(map[string]*Node, len(n.Children))
	keys := make([]string, 0, len(n.Children))
	for _, c := range n.Children {
		i := idx[c.Name]
		idx[c.Name]++
		k := ""
		if key != nil {
			k = key(c)
		}
		if k == "" {
			k = fmt.Sprintf("%d", i)
		}
		k = fmt.Sprintf("%s[%s]", c.Name, k)
		for base, j := k, 2; m[k] != nil; j++ {
			k = fmt.Sprintf("%s#%d", base, j)
		}
		m[k] = c
		keys = append(keys, k)
	}
	return keys, m
}
