mod supervisor;
