module example.com/gopulse-demo

go 1.21
