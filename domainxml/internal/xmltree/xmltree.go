// Package xmltree is a small generic XML element tree for the domainxml
// tests and the KubeVirt simulator: parse without resolving namespaces (so
// prefixes like "qemu:" survive), write back, and diff two trees. It knows
// nothing about libvirt; callers supply the few libvirt-specific keys.
package xmltree

import (
	"bytes"
	"encoding/xml"
	"errors"
	"fmt"
	"io"
	"strings"
)

// Node is one element. Names keep their raw prefix ("qemu:commandline").
type Node struct {
	Name     string
	Attrs    []xml.Attr // Attr.Name.Space holds the raw prefix, e.g. "xmlns"
	Text     string     // character data with surrounding whitespace trimmed
	Children []*Node
}

// maxDepth bounds recursion on hostile input; real domain XML is < 10 deep.
const maxDepth = 256

// Parse reads one XML document into a tree. Comments, processing
// instructions and directives are dropped.
func Parse(data []byte) (*Node, error) {
	d := xml.NewDecoder(bytes.NewReader(data))
	var stack []*Node
	var root *Node
	for {
		tok, err := d.RawToken()
		if errors.Is(err, io.EOF) {
			break
		}
		if err != nil {
			return nil, fmt.Errorf("parse xml: %w", err)
		}
		switch t := tok.(type) {
		case xml.StartElement:
			if root != nil && len(stack) == 0 {
				return nil, errors.New("parse xml: more than one root element")
			}
			if len(stack) >= maxDepth {
				return nil, fmt.Errorf("parse xml: nesting deeper than %d", maxDepth)
			}
			n := &Node{Name: rawName(t.Name), Attrs: append([]xml.Attr(nil), t.Attr...)}
			if len(stack) == 0 {
				root = n
			} else {
				p := stack[len(stack)-1]
				p.Children = append(p.Children, n)
			}
			stack = append(stack, n)
		case xml.EndElement:
			if len(stack) == 0 || stack[len(stack)-1].Name != rawName(t.Name) {
				return nil, fmt.Errorf("parse xml: unexpected end element </%s>", rawName(t.Name))
			}
			stack = stack[:len(stack)-1]
		case xml.CharData:
			if len(stack) > 0 {
				if s := strings.TrimSpace(string(t)); s != "" {
					stack[len(stack)-1].Text += s
				}
			}
		}
	}
	if root == nil {
		return nil, errors.New("parse xml: no root element")
	}
	if len(stack) != 0 {
		return nil, fmt.Errorf("parse xml: element <%s> not closed", stack[len(stack)-1].Name)
	}
	return root, nil
}

func rawName(n xml.Name) string {
	if n.Space == "" {
		return n.Local
	}
	return n.Space + ":" + n.Local
}

// AttrName is the raw (prefixed) name of an attribute.
func AttrName(a xml.Attr) string { return rawName(a.Name) }

// Attr returns the value of the attribute with raw name name.
func (n *Node) Attr(name string) (string, bool) {
	for _, a := range n.Attrs {
		if rawName(a.Name) == name {
			return a.Value, true
		}
	}
	return "", false
}

// SetAttr sets or adds an attribute.
func (n *Node) SetAttr(name, value string) {
	for i, a := range n.Attrs {
		if rawName(a.Name) == name {
			n.Attrs[i].Value = value
			return
		}
	}
	n.Attrs = append(n.Attrs, xml.Attr{Name: xml.Name{Local: name}, Value: value})
}

// DelAttr removes an attribute if present.
func (n *Node) DelAttr(name string) {
	out := n.Attrs[:0]
	for _, a := range n.Attrs {
		if rawName(a.Name) != name {
			out = append(out, a)
		}
	}
	n.Attrs = out
}

// Child returns the first child named name, or nil.
func (n *Node) Child(name string) *Node {
	for _, c := range n.Children {
		if c.Name == name {
			return c
		}
	}
	return nil
}

// All returns every child named name.
func (n *Node) All(name string) []*Node {
	var out []*Node
	for _, c := range n.Children {
		if c.Name == name {
			out = append(out, c)
		}
	}
	return out
}

// Remove deletes every child for which drop returns true.
func (n *Node) Remove(drop func(*Node) bool) {
	out := n.Children[:0]
	for _, c := range n.Children {
		if !drop(c) {
			out = append(out, c)
		}
	}
	n.Children = out
}

// Clone deep-copies the tree.
func (n *Node) Clone() *Node {
	c := &Node{Name: n.Name, Text: n.Text, Attrs: append([]xml.Attr(nil), n.Attrs...)}
	for _, ch := range n.Children {
		c.Children = append(c.Children, ch.Clone())
	}
	return c
}

// Marshal writes the tree tab-indented, the way KubeVirt formats domain XML
// (every element gets an explicit end tag, as encoding/xml writes it).
func (n *Node) Marshal() []byte {
	var b bytes.Buffer
	n.write(&b, 0)
	return b.Bytes()
}

func (n *Node) write(b *bytes.Buffer, depth int) {
	b.WriteString(strings.Repeat("\t", depth))
	b.WriteByte('<')
	b.WriteString(n.Name)
	for _, a := range n.Attrs {
		b.WriteByte(' ')
		b.WriteString(rawName(a.Name))
		b.WriteString(`="`)
		xmlEscape(b, a.Value)
		b.WriteByte('"')
	}
	b.WriteByte('>')
	if len(n.Children) == 0 {
		xmlEscape(b, n.Text)
	} else {
		if n.Text != "" {
			xmlEscape(b, n.Text)
		}
		b.WriteByte('\n')
		for _, c := range n.Children {
			c.write(b, depth+1)
		}
		b.WriteString(strings.Repeat("\t", depth))
	}
	b.WriteString("</")
	b.WriteString(n.Name)
	b.WriteString(">\n")
}

func xmlEscape(b *bytes.Buffer, s string) {
	// xml.EscapeText only fails if the writer fails; a bytes.Buffer does not.
	_ = xml.EscapeText(b, []byte(s))
}
